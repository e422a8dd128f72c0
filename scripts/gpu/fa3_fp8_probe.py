"""FlashAttention-3's FP8 forward against its fp16 forward and PyTorch's SDPA at SDXL's attention shapes (MLPerf's
batch of 8 images, CFG doubled), per call and summed over one UNet step: what FP8 attention would buy `dtype=fp8`,
the kernel alone and with the quantisation it needs (a scale per batch row and head for each of q, k and v, compiled
by Inductor, and the bf16 output cast back to fp16), with each one's error against fp32 attention.

    FA3_FP8=1 FA3_HDIMS=64 source scripts/gpu/setup.sh && python scripts/gpu/fa3_fp8_probe.py --out fa3-fp8.json
"""

import argparse
import json
import sys

import torch
from flash_attn_interface import flash_attn_func

from sdbatch import attention
from sdbatch.benchmark import time_cuda_ms

CUDA, HALF, FP8 = torch.device("cuda"), torch.float16, torch.float8_e4m3fn
# (batch, q tokens, kv tokens, heads, head width): calls per SDXL UNet step at 1024². 10 transformer layers run at
# 64×64 latents and 60 at 32×32, each with one self- and one cross-attention (77 prompt tokens): 140 calls.
SDXL_CALLS = {(16, 4096, 4096, 10, 64): 10, (16, 4096, 77, 10, 64): 10,
              (16, 1024, 1024, 20, 64): 60, (16, 1024, 77, 20, 64): 60}
CHECKED_ROWS = 2  # batch rows compared against fp32 attention (the whole batch's score matrix does not fit)


def quantise(t):
    """t (B, N, H, D) in e4m3 with one scale per batch row and head, and the descale FA3 multiplies back by."""
    amax = t.abs().amax(dim=(1, 3)).float().clamp(min=1e-6)
    scale = torch.finfo(FP8).max / amax
    return (t.float() * scale[:, None, :, None]).to(FP8), scale.reciprocal()


def quantise_all(q, k, v):
    return quantise(q), quantise(k), quantise(v)


def fa3(q, k, v, **descales):
    out = flash_attn_func(q, k, v, **descales)
    return out[0] if isinstance(out, tuple) else out


def fa3_descaled(q, k, v):
    """FA3's FP8 forward on (tensor, descale) pairs from quantise."""
    return fa3(q[0], k[0], v[0], q_descale=q[1], k_descale=k[1], v_descale=v[1])


def fa3_fp8(q, k, v):
    return fa3_descaled(*quantise_all(q, k, v)).to(q.dtype)


def measure(shape, compiled_fp8, compiled_quantise) -> dict:
    torch.manual_seed(0)
    q, k = attention.random_qkv(shape, CUDA, HALF)
    v = torch.randn_like(k)
    quantised = quantise_all(q, k, v)
    variants = {
        "sdpa": lambda: attention.sdpa(q, k, v),
        "fa3-fp16": lambda: fa3(q, k, v),
        "fa3-fp8-kernel": lambda: fa3_descaled(*quantised),
        "fp8-quantise": lambda: compiled_quantise(q, k, v),
        "fa3-fp8-quantised": lambda: compiled_fp8(q, k, v),
    }
    rows = CHECKED_ROWS
    reference = attention.sdpa(q[:rows].float(), k[:rows].float(), v[:rows].float(), {"kernel": "math"})
    row = {"shape": list(shape), "calls_per_step": SDXL_CALLS[shape]}
    for name, fn in variants.items():
        ms = time_cuda_ms(fn, warmup=3, repeats=20)
        row[name] = {"ms": ms, "tflops": attention.attention_flops(shape) / ms / 1e9}
        if name != "fp8-quantise":
            out = fn()[:rows].float()
            row[name]["max_abs_err"] = (out - reference).abs().max().item()
            row[name]["rel_rms_err"] = ((out - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    return row


def variant_cells(row: dict) -> list[tuple[str, dict]]:
    return [(name, cell) for name, cell in row.items() if isinstance(cell, dict)]


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 16  # one graph per shape
    compiled_fp8 = torch.compile(fa3_fp8, dynamic=False)
    compiled_quantise = torch.compile(quantise_all, dynamic=False)
    rows = []
    for shape in SDXL_CALLS:
        row = measure(shape, compiled_fp8, compiled_quantise)
        rows.append(row)
        cells = [f"{name} {cell['ms']:.3f} ms {cell['tflops']:.0f} TF/s"
                 + (f" err {cell['rel_rms_err']:.4f}" if "rel_rms_err" in cell else "")
                 for name, cell in variant_cells(row)]
        print(shape, "x", row["calls_per_step"], "|", " | ".join(cells), flush=True)
    step = {name: sum(row[name]["ms"] * row["calls_per_step"] for row in rows) for name, _ in variant_cells(rows[0])}
    print("per UNet step (ms):", {name: round(ms, 2) for name, ms in step.items()}, flush=True)
    if args.out:
        import flash_attn_config
        report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "flash_attn_3_build": flash_attn_config.CONFIG["build_flags"],
                  "command": " ".join(["python", *sys.argv]), "rows": rows, "per_step_ms": step}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
