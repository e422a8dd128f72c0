"""Attention micro-benchmark on a GPU: every backend and kernel on the real attention shapes of SD1.5 (512),
SD2.1 (768) and SDXL (1024), then whole UNet steps with each backend (ours and diffusers' stock processors).

    python scripts/bench_attention.py --out docs/benchmarks/attention-h200.json

Full-size architectures with random fp16 weights (speed does not depend on the weights).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import matmul_peak_tflops, peak_memory_gib, unet_step_ms
from sdbatch.models import random_model

ARCHS = [("sd15", 512, 32), ("sd21", 768, 8), ("sdxl", 1024, 8)]  # (arch, size, UNet batch incl. CFG doubling)
VARIANTS = [("vanilla", {}), ("sdpa", {"kernel": "auto"}), ("sdpa", {"kernel": "flash"}),
            ("sdpa", {"kernel": "efficient"}), ("sdpa", {"kernel": "cudnn"}), ("sdpa", {"kernel": "math"}),
            ("xformers", {"op": "cutlass"}), ("xformers", {"op": "flash"}), ("xformers", {"op": "flash3"})]


def shape_rows(model, batch, size, peak):
    rows = []
    for shape in attention.attention_shapes(model, batch // 2, size, size):
        flops = attention.attention_flops(shape)
        timings = {}
        for variant in VARIANTS:
            ms = attention.time_variant(variant, shape, torch.device("cuda"), torch.float16)
            timings[attention.describe(variant)] = None if math.isinf(ms) else ms
        rows.append({"shape": dict(zip(("batch", "q_tokens", "kv_tokens", "heads", "head_dim"), shape)),
                     "ms": timings,
                     "tflops": {k: (flops / ms / 1e9 if ms else None) for k, ms in timings.items()},
                     "peak_fraction": {k: (flops / ms / 1e9 / peak if ms else None) for k, ms in timings.items()}})
    return rows


def unet_rows(model, batch, size):
    device, dtype = torch.device("cuda"), torch.float16
    ours = {name: OmegaConf.create({"name": name, **options}) for name, options in
            [("vanilla", {}), ("sdpa", {"kernel": "auto"}), ("xformers", {"op": "auto"}), ("auto", {})]}
    setups = {
        "diffusers AttnProcessor (stock vanilla)": AttnProcessor(),
        "diffusers AttnProcessor2_0 (stock sdpa)": AttnProcessor2_0(),
        "diffusers XFormersAttnProcessor (stock)": XFormersAttnProcessor(),
    }
    for name, cfg in ours.items():
        setups[f"sdbatch attention={name}"] = attention.DispatchProcessor(
            attention.choose(cfg, model, device, dtype, batch // 2, size, size))
    results = {}
    for name, processor in setups.items():
        model.unet.set_attn_processor(processor)
        timing = {}
        mem = peak_memory_gib(lambda: timing.update(ms=unet_step_ms(model, batch, size, size)))
        ms = timing["ms"]
        detail = processor.choice.detail if isinstance(processor, attention.DispatchProcessor) else ""
        results[name] = {"ms": ms, "peak_mem_gib": mem, "detail": detail}
        print(f"  {name:45s} {ms:8.1f} ms  {mem:6.1f} GiB", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/attention-h200.json")
    parser.add_argument("--archs", default=",".join(a for a, _, _ in ARCHS))
    args = parser.parse_args()
    import xformers
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: fp16 matmul {peak:.0f} TFLOP/s", flush=True)
    report = {"gpu": torch.cuda.get_device_name(), "matmul_tflops": peak, "command": " ".join(sys.argv),
              "versions": {"torch": torch.__version__, "xformers": xformers.__version__}, "archs": {}}
    for arch, size, batch in ARCHS:
        if arch not in args.archs.split(","):
            continue
        start = time.time()
        model = random_model(arch).to(torch.device("cuda"), torch.float16)
        print(f"{arch} {size}x{size}, UNet batch {batch}:", flush=True)
        report["archs"][arch] = {"size": size, "unet_batch": batch, "shapes": shape_rows(model, batch, size, peak),
                                 "unet_step": unet_rows(model, batch, size)}
        steps = report["archs"][arch]["unet_step"]
        best_sdpa = min(steps["diffusers AttnProcessor2_0 (stock sdpa)"]["ms"], steps["sdbatch attention=sdpa"]["ms"])
        xf, vanilla = steps["sdbatch attention=xformers"]["ms"], steps["sdbatch attention=vanilla"]["ms"]
        report["archs"][arch]["summary"] = {"xformers_over_best_sdpa": xf / best_sdpa, "vanilla_over_xformers": vanilla / xf}
        print(f"  xformers / best sdpa = {xf / best_sdpa:.3f}; vanilla / xformers = {vanilla / xf:.2f}x "
              f"({time.time() - start:.0f}s)", flush=True)
        del model
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is measured survives a timeout


if __name__ == "__main__":
    main()
