"""UNet-step levers on a GPU, one at a time, at the run's real batch: eager SDPA as the base, then cuDNN autotuning,
fused QKV, channels_last and torch.compile modes (with their compile times).

    python scripts/bench_unet.py --arch sd15 --size 512 --batch 32 --out docs/benchmarks/unet-levers-h200.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import matmul_peak_tflops, unet_flops_per_latent, unet_step_ms
from sdbatch.models import random_model, random_unet_inputs


def step_ms(model, batch, size):
    return unet_step_ms(model, batch, size, size, repeats=20)


def tune_inductor():
    """Inductor settings diffusers recommends for UNets (1x1 convs as matmuls, coordinate-descent tuning)."""
    import torch._inductor.config as inductor
    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--levers", default="eager,cudnn,fused,channels_last,compile")
    parser.add_argument("--out", default="docs/benchmarks/unet-levers-h200.json")
    args = parser.parse_args()
    peak = matmul_peak_tflops()
    model = random_model(args.arch).to(torch.device("cuda"), torch.float16)
    flops = unet_flops_per_latent(model, args.size, args.size) * args.batch
    choice = attention.choose(OmegaConf.create({"name": args.attention}), model, torch.device("cuda"), torch.float16,
                              args.batch // 2, args.size, args.size)
    attention.apply(model, choice)
    rows = []

    def record(name, ms, compile_s=None):
        rows.append({"lever": name, "ms": ms, "tflops": flops / ms / 1e9, "mfu": flops / ms / 1e9 / peak,
                     "compile_s": compile_s})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # what is measured survives a timeout
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "matmul_tflops": peak,
                                              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                                              "arch": args.arch, "size": args.size, "batch": args.batch,
                                              "flops_per_step": flops, "attention": choice.detail, "rows": rows},
                                             indent=1))
        extra = f"  (compile {compile_s:.0f}s)" if compile_s else ""
        print(f"{name:40s} {ms:7.1f} ms  {flops / ms / 1e9:5.0f} TFLOP/s  MFU {flops / ms / 1e9 / peak:.0%}{extra}",
              flush=True)

    levers = args.levers.split(",")
    record("eager", step_ms(model, args.batch, args.size))
    torch.backends.cudnn.benchmark = True
    record("+ cudnn.benchmark", step_ms(model, args.batch, args.size))
    if "fused" in levers:
        model.optimise(fuse_qkv=True, fp8=False, channels_last=False, compile_mode=None)
        record("+ fused QKV", step_ms(model, args.batch, args.size))
    if "channels_last" in levers:
        model.unet.to(memory_format=torch.channels_last)
        record("+ channels_last (eager)", step_ms(model, args.batch, args.size))
        model.unet.to(memory_format=torch.contiguous_format)
    for lever in levers:  # compile[:MODE][+cl][+tune][+gemm]
        if not lever.startswith("compile"):
            continue
        mode, *flags = (lever.partition(":")[2] or "default").split("+")
        mode = mode or "default"
        eager_unet = model.unet
        torch._dynamo.reset()  # else a later lever reuses the earlier lever's compiled code and compiles nothing
        if "cl" in flags:
            model.unet.to(memory_format=torch.channels_last)
        if "tune" in flags:
            tune_inductor()
        if "gemm" in flags:  # autotune only the matmuls and convolutions' GEMM templates, not every kernel
            torch._inductor.config.max_autotune_gemm = True
        model.unet = torch.compile(eager_unet, mode=mode, dynamic=False)
        start = time.perf_counter()
        x, embeds, added = random_unet_inputs(model, args.batch, args.size, args.size)
        with torch.no_grad():
            model.unet(x, torch.tensor(500, device="cuda"), encoder_hidden_states=embeds, added_cond_kwargs=added)
        torch.cuda.synchronize()
        record(f"+ torch.compile({mode}){''.join(' +' + f for f in flags)}", step_ms(model, args.batch, args.size),
               time.perf_counter() - start)
        model.unet = eager_unet.to(memory_format=torch.contiguous_format)


if __name__ == "__main__":
    main()
