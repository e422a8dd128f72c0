"""FlashAttention-3 through xformers against PyTorch's kernels, per attention call, on SD1.5's and SDXL's real
shapes (batch 32 and 8 images, CFG doubled), with each kernel's largest error against fp32 attention where that
fits in memory. Then the build check: a head wider than the installed build has is refused, while the same call
straight into xformers, in a child process, kills that process.

    source scripts/gpu/setup.sh && python scripts/gpu/fa3_probe.py     # .whl carries flash-attention's sources
"""

import subprocess
import sys

import torch

from sdbatch import attention

CUDA, HALF = torch.device("cuda"), torch.float16
VARIANTS = [("sdpa", {"kernel": "auto"}), ("sdpa", {"kernel": "cudnn"}), ("xformers", {"op": "flash"}),
            ("xformers", {"op": "flash3"})]
SHAPES = [(64, 4096, 4096, 8, 40), (64, 4096, 77, 8, 40), (64, 1024, 1024, 8, 80), (64, 256, 256, 8, 160),
          (16, 4096, 4096, 10, 64), (16, 1024, 1024, 20, 64), (16, 4096, 77, 10, 64)]
UNCHECKED = """import torch, xformers.ops as x
q = torch.randn(2, 64, 4, 256, device="cuda", dtype=torch.half)
x.memory_efficient_attention_forward(q, q, q, op=x.fmha.flash3.FwOp); torch.cuda.synchronize(); print("ran")"""


def row(shape) -> str:
    batch, q_tokens, kv_tokens, heads, _ = shape
    q, kv = attention.random_qkv(shape, CUDA, HALF)
    fits = batch * heads * q_tokens * kv_tokens <= 2 ** 30  # the fp32 reference's score matrix
    reference = attention.sdpa(q.float(), kv.float(), kv.float(), {"kernel": "math"}) if fits else None
    cells = []
    for variant in VARIANTS:
        ms = attention.time_variant(variant, shape, CUDA, HALF)
        error = ""
        if reference is not None and ms != float("inf"):
            out = attention.BACKENDS[variant[0]](q, kv, kv, variant[1]).float()
            error = f" err {(out - reference).abs().max().item():.4f}"
        cells.append(f"{attention.describe(variant)} {ms:.3f}ms{error}")
    return f"{shape} " + " | ".join(cells)


def main():
    for shape in SHAPES:
        print(row(shape), flush=True)
    q = torch.randn(2, 64, 4, 256, device=CUDA, dtype=HALF)
    try:
        attention.xformers(q, q, q, {"op": "flash3"})
    except ValueError as error:
        print("guard:", error)
    done = subprocess.run([sys.executable, "-c", UNCHECKED], capture_output=True, text=True)
    print("unguarded width 256 on a build without it: exit", done.returncode, done.stdout[-300:], done.stderr[-600:])


if __name__ == "__main__":
    main()
