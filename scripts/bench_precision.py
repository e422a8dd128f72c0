"""What a precision buys and costs on one GPU: the UNet step (eager and compiled) in fp16 and in dtype=fp8, the VAE
decode in fp32, bf16 and fp16, each with its deviation from the fp32 result on the same inputs.

    python scripts/bench_precision.py --arch sdxl --size 1024 --batch 8 --out docs/benchmarks/precision-h100-sdxl.json

Deviation is measured on one call, not a whole render: on random weights 50 denoising steps amplify any rounding
until two precisions give unrelated images (docs/benchmarks/notes.md), while one call's error is what a trained
denoiser would see at each step. UNet: relative L2 error of the noise prediction. VAE: PSNR of the decoded images
(0..255) against fp32.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdbatch import attention, fp8  # noqa: E402
from sdbatch.benchmark import matmul_peak_tflops, time_cuda_ms, unet_flops_per_latent  # noqa: E402
from sdbatch.compare import psnr  # noqa: E402
from sdbatch.models import fuse_projections, random_model, random_unet_inputs  # noqa: E402

CUDA = torch.device("cuda")


def unet_call(model, inputs):
    x, embeds, added = inputs
    with torch.no_grad():
        return model.unet(x, torch.tensor(500, device="cuda"), encoder_hidden_states=embeds,
                          added_cond_kwargs=added).sample


def cast(inputs, dtype):
    x, embeds, added = inputs
    return x.to(dtype), embeds.to(dtype), {k: v.to(dtype) for k, v in (added or {}).items()} or None


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def step_ms(model, inputs) -> float:
    return time_cuda_ms(lambda: unet_call(model, inputs), repeats=10)


KERNEL_KINDS = [  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native")),
    ("fp8 matmul", ("f8f8", "e4m3", "fp8")),
    ("convolution", ("conv", "fprop", "implicit", "winograd", "dgrad")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "ampere", "hopper")),
    ("fused elementwise/norm (triton)", ("triton",)),
]


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lower for key in keys)), "other")


def profile(model, inputs) -> dict:
    """GPU time of one UNet call by kind of kernel, and its ten longest kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    unet_call(model, inputs)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        unet_call(model, inputs)
        torch.cuda.synchronize()
    kinds, kernels = {}, []
    for event in prof.key_averages():
        ms = event.device_time_total / 1000
        if ms <= 0:
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels.append((ms, event.count, event.key[:120]))
    return {"by_kind_ms": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "calls": n, "name": name} for ms, n, name in sorted(kernels, reverse=True)[:10]]}


def compiled_step(model, inputs) -> dict:
    """Compile seconds, median step ms and a kernel profile of the UNet under torch.compile; leaves the eager
    UNet in place."""
    eager = model.unet
    torch._dynamo.reset()
    model.unet = torch.compile(eager, dynamic=False)
    start = time.perf_counter()
    unet_call(model, inputs)
    torch.cuda.synchronize()
    result = {"compile_s": time.perf_counter() - start, "compiled_ms": step_ms(model, inputs),
              "compiled_profile": profile(model, inputs)}
    model.unet = eager
    return result


def images(decoded) -> np.ndarray:
    """Decoded images as rounded 0..255 values."""
    return ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().cpu().numpy()


def unet_rows(args, model, report):
    batch = 2 * args.batch  # latents per call: every image twice with guidance
    torch.manual_seed(0)
    probe = random_unet_inputs(model, 2, args.size, args.size)  # fp32: the deviation probe
    reference = unet_call(model, probe)
    model.to(CUDA, torch.float16)
    choice = attention.choose(OmegaConf.create({"name": "sdpa"}), model, CUDA, torch.float16, args.batch,
                              args.size, args.size)
    attention.apply(model, choice)
    fuse_projections(model)
    flops = unet_flops_per_latent(model, args.size, args.size) * batch  # counted on fp16 matmuls for both rows
    torch.backends.cudnn.benchmark = True
    half_probe, timed = cast(probe, torch.float16), random_unet_inputs(model, batch, args.size, args.size)
    half = unet_call(model, half_probe)
    rows = [{"name": "unet-fp16", "rel_error_vs_fp32": relative_error(half, reference),
             "eager_ms": step_ms(model, timed)}]
    rows[-1].update(compiled_step(model, timed))
    half_unet = model.unet
    for name, after_geglu in (("unet-fp8", True), ("unet-fp8-geglu-out-fp16", False)):
        model.unet = copy.deepcopy(half_unet)
        converted = fp8.convert_unet(model.unet, after_geglu=after_geglu)
        eight = unet_call(model, half_probe)
        rows.append({"name": name, "linears_converted": converted,
                     "rel_error_vs_fp32": relative_error(eight, reference),
                     "rel_error_vs_fp16": relative_error(eight, half), "eager_ms": step_ms(model, timed)})
        rows[-1].update(compiled_step(model, timed))
    model.unet = half_unet
    for row in rows:
        row["compiled_tflops"] = flops / row["compiled_ms"] / 1e9
        print(json.dumps({k: v for k, v in row.items() if k != "compiled_profile"}), flush=True)
        print(json.dumps(row["compiled_profile"]["by_kind_ms"]), flush=True)
    report["unet_flops_per_call"] = flops
    report["rows"] += rows


def vae_rows(args, model, report):
    vae = model.vae.to(CUDA, torch.float32)
    torch.manual_seed(1)
    factor = model.vae_scale_factor
    z = torch.randn(args.batch, vae.config.latent_channels, args.size // factor, args.size // factor, device="cuda")
    with torch.no_grad():
        reference = images(vae.decode(z / vae.config.scaling_factor).sample)
    for name, dtype in (("vae-fp32", torch.float32), ("vae-bf16", torch.bfloat16), ("vae-fp16", torch.float16)):
        cast_vae = copy.deepcopy(vae).to(dtype)
        latents = (z / vae.config.scaling_factor).to(dtype)
        with torch.no_grad():
            decoded = cast_vae.decode(latents).sample
            ms = time_cuda_ms(lambda: cast_vae.decode(latents), warmup=2, repeats=5)
        row = {"name": name, "decode_ms": ms, "psnr_vs_fp32": psnr(images(decoded), reference),
               "max_abs_levels": float(np.abs(images(decoded) - reference).max()),
               "non_finite": int((~torch.isfinite(decoded)).sum())}
        print(json.dumps(row), flush=True)
        report["rows"].append(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="images per batch (the UNet sees twice as many)")
    parser.add_argument("--parts", default="unet,vae")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv), "arch": args.arch,
              "size": args.size, "batch_images": args.batch, "matmul_tflops_fp16": matmul_peak_tflops(),
              "versions": {"torch": torch.__version__}, "rows": []}
    model = random_model(args.arch).to(CUDA, torch.float32)
    if "vae" in args.parts:
        vae_rows(args, model, report)
    if "unet" in args.parts:
        unet_rows(args, model, report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
