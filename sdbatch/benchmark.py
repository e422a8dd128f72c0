"""Measurement helpers shared by the benchmark scripts and GPU tests: CUDA-event timing, matmul peak, UNet cost."""

import statistics

import torch

from sdbatch.models import dummy_unet_call, random_unet_inputs


def time_cuda_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of fn() measured with CUDA events, after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak_tflops(n: int = 8192, dtype=torch.float16) -> float:
    """Achieved TFLOP/s of an n^3 matmul on random data: the ceiling that MFU is stated against."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_cuda_ms(lambda: a @ b, warmup=5, repeats=20)
    return 2 * n ** 3 / ms / 1e9


@torch.no_grad()
def unet_flops_per_latent(model, width: int, height: int) -> float:
    """FLOPs of one UNet call for one latent at this size (counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        dummy_unet_call(model, 1, width, height)
    return float(counter.get_total_flops())


def unet_step_ms(model, batch: int, width: int, height: int, repeats: int = 10) -> float:
    """Median milliseconds of one UNet call at this batch and size."""
    x, embeds, added = random_unet_inputs(model, batch, width, height)
    t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        return time_cuda_ms(lambda: model.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added),
                            repeats=repeats)


def peak_memory_gib(fn) -> float:
    """Peak GPU memory allocated while fn() runs, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30
