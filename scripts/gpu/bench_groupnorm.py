"""GroupNorm+SiLU between two convolutions, at the UNets' shapes: Inductor's kernels channels-last and in NCHW,
torch's eager kernels, and the Triton passes of triton_groupnorm.py, each compiled as a run compiles it.

    source scripts/gpu/setup.sh && python scripts/gpu/bench_groupnorm.py --out $OUT/groupnorm-h100.json

Per shape and setup: the block's time (conv, norm, SiLU, conv), the GPU time of everything but the convolutions
(the norm's share), and the largest difference from torch's eager fp16 result.
"""

import argparse
import json
import sys

import torch
from torch import nn

from sdbatch.benchmark import time_cuda_ms

from profile_attention import kernels, kind  # this script's folder (both)
from triton_groupnorm import GroupNorm

CUDA = torch.device("cuda")
# name: (batch, input channels, side, output channels) of a ResnetBlock2D's norm1 at the run's batch (CFG doubles it)
SHAPES = {
    "sdxl-128-960": (16, 960, 128, 320), "sdxl-128-640": (16, 640, 128, 320), "sdxl-128-320": (16, 320, 128, 320),
    "sdxl-32-2560": (16, 2560, 32, 1280),
    "sd15-64-640": (64, 640, 64, 320), "sd15-64-320": (64, 320, 64, 320), "sd15-16-2560": (64, 2560, 16, 1280),
}
DENSE = ("convolution", "convolution layout", "matmul")  # profile_attention's kinds that are not the norm's


class Block(nn.Module):
    def __init__(self, channels: int, out_channels: int, triton_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        norm = nn.GroupNorm(32, channels, eps=1e-5)
        self.norm = GroupNorm(norm, silu=True) if triton_norm else nn.Sequential(norm, nn.SiLU())
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.norm(self.conv1(x)))


def norm_ms(fn) -> float:
    """GPU milliseconds of one call outside the convolution kernels (and cuDNN's layout transforms)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in kernels(prof.key_averages()) if kind(e.key) not in DENSE) / 1e3


def measure(name: str, shape, setup: str, reference=None):
    batch, channels, side, out_channels = shape
    torch.manual_seed(0)
    block = Block(channels, out_channels, triton_norm=setup == "triton-cl").to(CUDA, torch.float16).eval()
    x = torch.randn(batch, channels, side, side, device=CUDA, dtype=torch.float16)
    if setup != "inductor-nchw":
        block, x = block.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch._inductor.config.patch(layout_optimization=setup != "inductor-nchw"):
        fn = block if setup == "eager-cl" else torch.compile(block, dynamic=False)
        with torch.no_grad():
            out = fn(x)
            row = {"shape": name, "setup": setup, "block_ms": time_cuda_ms(lambda: fn(x)),
                   "norm_ms": norm_ms(lambda: fn(x))}
    if reference is not None:
        row["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
    return row, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--setups", default="eager-cl,inductor-cl,inductor-nchw,triton-cl")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for name in args.shapes.split(","):
        reference = None
        for setup in args.setups.split(","):
            row, out = measure(name, SHAPES[name], setup, reference)
            reference = out if reference is None else reference
            rows.append(row)
            print(f"{name:14s} {setup:14s} block {row['block_ms']:7.3f} ms  norm+silu {row['norm_ms']:7.3f} ms"
                  f"  max diff {row.get('max_abs_diff', 0):.3g}", flush=True)
    if args.out:
        report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "command": " ".join(["python", *sys.argv]), "rows": rows}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
