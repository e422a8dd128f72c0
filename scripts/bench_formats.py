"""Bytes and CPU encode time per image for each output format, encoded as the writer does (metadata included).

The photo used for docs/benchmarks/formats-cpu.json is scikit-image's astronaut (512x512 RGB), taken from the wheel,
where it is bundled (skimage.data.astronaut() reads that file; nothing is downloaded):

    pip download scikit-image==0.26.0 --no-deps --only-binary :all: -d /tmp/wheels
    unzip -o -j /tmp/wheels/scikit_image-0.26.0-*.whl skimage/data/astronaut.png -d /tmp
    python3 scripts/bench_formats.py --image /tmp/astronaut.png \
        --image-source "scikit-image 0.26.0 wheel: skimage/data/astronaut.png" --out docs/benchmarks/formats-cpu.json

Without --image it uses skimage.data.astronaut() when scikit-image is installed, else a synthetic 512x512 image.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

from sdbatch.writer import ImageFormat, a1111_parameters

FORMATS = {"png": ImageFormat("png"), "webp q90": ImageFormat("webp", 90),
           "webp lossless": ImageFormat("webp", 90, lossless=True), "jpeg q90": ImageFormat("jpeg", 90),
           "webp lossless q1": ImageFormat("webp", 1, lossless=True)}  # lossless: quality is the effort
PROMPT = "a photo of an astronaut in a white spacesuit holding a helmet, american flag behind, studio lighting"


def load_image(path: str | None) -> tuple[np.ndarray, dict]:
    if path:
        data = Path(path).read_bytes()
        return np.asarray(Image.open(path).convert("RGB")), {"file": path, "sha256": hashlib.sha256(data).hexdigest()}
    try:
        from skimage import data
        return data.astronaut(), {"file": "skimage.data.astronaut()"}
    except ImportError:
        y, x = np.mgrid[0:512, 0:512]
        noise = np.random.default_rng(0).normal(0, 8, (512, 512, 3))
        image = np.stack([x / 2, y / 2, 128 + 60 * np.sin(x / 9) * np.cos(y / 13)], axis=-1) + noise
        return image.clip(0, 255).astype(np.uint8), {"file": "synthetic: gradients, sine pattern, Gaussian noise"}


def provenance() -> dict:
    """A provenance document the size of the one run.py writes."""
    row = {"id": "catalog-000042", "image_index": 0, "seed": 42, "prompt": PROMPT, "negative_prompt": "blurry",
           "width": 512, "height": 512, "steps": 50, "guidance_scale": 7.5, "content_key": "0" * 64,
           "image_path": "images/00003/catalog-000042-0123456789ab_0.png", "status": "ok", "reason": None,
           "truncated": False, "attention_backend": "sdpa", "attention_detail": "sdpa:flash", "model": "sd15",
           "scheduler": "pndm", "shard": 3, "worker_index": 0, "num_workers": 8, "device": "cuda:0 (NVIDIA H100)",
           "batch_size": 32, "text_encode_s": 0.01, "denoise_s": 0.2, "vae_decode_s": 0.02, "write_s": None,
           "finished_at": "2026-01-01T00:00:00+00:00"}
    return {"sdbatch": "0.1.0", "model": "sd15", "scheduler": "pndm", "dtype": "fp16",
            "versions": {"torch": "2.13.0", "diffusers": "0.42.1"}, "manifest_row": {"id": row["id"], "prompt": PROMPT},
            "content_key": row["content_key"], "ledger": row}


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return None if mse == 0 else round(float(10 * np.log10(255 ** 2 / mse)), 2)


def measure(image_format: ImageFormat, pixels: np.ndarray, parameters: str, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        data = image_format.encode(pixels, parameters, provenance())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = image_format.encode(pixels, parameters, provenance())
        times.append((time.perf_counter() - start) * 1000)
    with Image.open(io.BytesIO(data)) as decoded:
        error = psnr(np.asarray(decoded.convert("RGB")), pixels)
    return {"bytes": len(data), "encode_ms_median": round(statistics.median(times), 2),
            "encode_ms_min": round(min(times), 2), "psnr_db": error if error is not None else "lossless",
            "format": image_format.name, "quality": image_format.quality, "lossless": image_format.lossless}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="an RGB image file (default: skimage.data.astronaut(), else synthetic)")
    parser.add_argument("--image-source", help="where the image came from, recorded in the JSON")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="docs/benchmarks/formats-cpu.json")
    args = parser.parse_args()

    pixels, image = load_image(args.image)
    image.update(shape=list(pixels.shape), source=args.image_source)
    parameters = a1111_parameters(PROMPT, "blurry", 50, "PNDM", 7.5, 42, pixels.shape[1], pixels.shape[0], "sd15")
    load_before = os.getloadavg()
    results = {name: measure(f, pixels, parameters, args.warmup, args.repeats) for name, f in FORMATS.items()}
    report = {
        "command": shlex.join(["python3", *sys.argv]),
        "image": image,
        "metadata": {"parameters_chars": len(parameters), "provenance_json_bytes": len(json.dumps(provenance()))},
        "warmup": args.warmup, "repeats": args.repeats,
        "machine": {"cpu": cpu_model(), "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "pillow": PIL.__version__, "libjpeg-turbo": features.version("libjpeg_turbo"),
                    "libwebp": features.version("webp"),
                    "zlib": features.version("zlib"), "loadavg_before_after": [load_before[0], os.getloadavg()[0]]},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:14s} {r['bytes']:>9,d} bytes  {r['encode_ms_median']:7.2f} ms  PSNR {r['psnr_db']}")


if __name__ == "__main__":
    main()
