"""What a night costs: images per GPU-hour and the price of 1,000 images, from GPU-busy seconds (plain Python).

GPU-busy seconds are the seconds a GPU spent in text encoding, denoising and VAE decoding: the ledger's per-image
stage shares summed over images, or a worker's batch stage times summed over batches. Image writes (on CPU
threads), model loading, compile warm-up outside batches and idle time are not in them, so a bill by the hour is
higher than these figures.
"""

DEVICE_STAGES = ("text_encode_s", "denoise_s", "vae_decode_s")  # the stages that run on the device


def gpu_hour_figures(images: int, gpu_seconds: float, gpu_hour_cost: float | None = None) -> dict | None:
    """{'gpu_hours', 'images_per_gpu_hour', 'cost_per_1000' (None without a price or an image)}, or None when no
    GPU time was spent."""
    if not gpu_seconds or gpu_seconds <= 0:
        return None
    gpu_hours = gpu_seconds / 3600
    priced = gpu_hour_cost is not None and images > 0
    return {
        "gpu_hours": gpu_hours,
        "images_per_gpu_hour": images / gpu_hours,
        "cost_per_1000": gpu_hour_cost * gpu_hours / images * 1000 if priced else None,
    }


def cost_lines(images: int, gpu_seconds: float, gpu_hour_cost: float | None = None) -> list[str]:
    """The summary's cost line for `images` ok images made in `gpu_seconds` GPU-busy seconds; none when
    gpu_seconds is 0 (nothing ran on a GPU)."""
    figures = gpu_hour_figures(images, gpu_seconds, gpu_hour_cost)
    if figures is None:
        return []
    line = f"GPU: {amount(figures['images_per_gpu_hour'])} images per GPU-hour"
    if figures["cost_per_1000"] is not None:
        line += f", {amount(figures['cost_per_1000'])} per 1,000 images at gpu_hour_cost={gpu_hour_cost:g}"
    line += f" ({images:,} ok images in {figures['gpu_hours']:.3g} GPU-hours of encode, denoise and decode)"
    if gpu_hour_cost is None:
        line += "; gpu_hour_cost= gives the cost per 1,000 images"
    return [line]


def amount(value: float) -> str:
    """A figure as people read it: 2,400 or 12.35 or 0.833."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}" if value >= 10 else f"{value:.3g}"
