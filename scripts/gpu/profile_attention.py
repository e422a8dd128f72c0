"""One UNet step with each attention setup, set up as a run sets it up (fused projections, channels-last, and
torch.compile unless --eager): step time, how much of it the GPU was busy, host syncs, where the GPU time goes by
kind of kernel (matmuls, convolutions, attention, Inductor's fused kernels) with each kind's TFLOP/s against the
measured fp16 matmul peak, and the top CUDA kernels.

    source scripts/gpu/setup.sh && python scripts/gpu/profile_attention.py                      # SD1.5, compiled
    python scripts/gpu/profile_attention.py --model sdxl --size 1024 --latents 16 --eager \\
        --setups stock,sdpa,sdpa/auto,xformers
    python scripts/gpu/profile_attention.py --model sdxl --size 1024 --latents 16 --contiguous --fp8 --setups sdpa

A setup is `stock` (diffusers' AttnProcessor2_0), `stock-xformers` (its XFormersAttnProcessor), or an sdbatch
attention setting `name[/kernel-or-op]` (`sdpa` chooses a kernel per shape, `sdpa/auto` leaves it to PyTorch).
"""

import argparse

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import matmul_peak_tflops, time_cuda_ms
from sdbatch.models import dummy_unet_call, random_model, random_unet_inputs

CUDA = torch.device("cuda")
STOCK = {"stock": AttnProcessor2_0, "stock-xformers": XFormersAttnProcessor}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")
# Kernel kinds by name, first match wins. Inductor names its kernels after the ops they fuse (a convolution's bias,
# an attention output's scale), so its prefixes come first; cuDNN's attention kernels say "fprop" too, so
# attention comes before convolutions.
KINDS = (
    ("Inductor reductions (norms, row maxima)", ("triton_red", "triton_per")),
    ("Inductor pointwise", ("triton",)),
    ("attention", ("fmha", "flash", "sdpa", "attention", "attn")),
    ("convolution layout", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("conv", "fprop", "implicit")),
    ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "xmma")),
)
FLOP_KINDS = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul", "convolution": "convolution"}


def processor(setup: str, model, args):
    if setup in STOCK:
        return STOCK[setup](), "diffusers' stock processor"
    name, _, kernel = setup.partition("/")
    cfg = {"name": name, **({"op" if name == "xformers" else "kernel": kernel} if kernel else {})}
    images = args.latents // 2
    choice = attention.choose(OmegaConf.create(cfg), model, CUDA, torch.float16, images, args.size, args.size)
    return attention.DispatchProcessor(choice), choice.detail


def kind(kernel: str) -> str:
    name = kernel.lower()
    return next((label for label, words in KINDS if any(word in name for word in words)), "other")


def flops_by_kind(model, args) -> dict[str, float]:
    """FLOPs of one UNet call at the profiled batch, by kind (with diffusers' SDPA processor, before any lever)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        dummy_unet_call(model, 1, args.size, args.size)
    flops = {}
    for op, count in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[-1]
        label = FLOP_KINDS.get(name, "attention" if "attention" in name else "other")
        flops[label] = flops.get(label, 0.0) + count * args.latents
    return flops


def kernels(events) -> list:
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_list(events, min_ms: float) -> str:
    """Every kernel taking at least min_ms of the step, with the kind it was counted as (to check the table)."""
    rows = sorted(kernels(events), key=lambda e: -e.self_device_time_total)
    return "\n".join(f"    {e.self_device_time_total / 1e3:8.2f} ms {e.count:5d}x  {kind(e.key):<40} {e.key[:110]}"
                     for e in rows if e.self_device_time_total / 1e3 >= min_ms)


def kinds_table(events, flops: dict[str, float], step_ms: float, peak: float) -> str:
    """GPU time per kernel kind, its share of the step, and its TFLOP/s (where torch counts its FLOPs)."""
    ms = {}
    for e in kernels(events):
        label = kind(e.key)
        ms[label] = ms.get(label, 0.0) + e.self_device_time_total / 1e3
    lines = [f"    {'kind':<42}{'ms':>8}{'% of step':>11}{'TFLOP':>8}{'TFLOP/s':>9}{'% of peak':>11}"]
    for label, t in sorted(ms.items(), key=lambda item: -item[1]):
        line, work = f"    {label:<42}{t:>8.1f}{100 * t / step_ms:>10.1f}%", flops.get(label)
        if work:
            line += f"{work / 1e12:>8.2f}{work / t / 1e9:>9.0f}{100 * work / t / 1e9 / peak:>10.0f}%"
        lines.append(line)
    dense = flops.get("matmul", 0.0) + flops.get("convolution", 0.0)
    dense_ms = ms.get("matmul", 0.0) + ms.get("convolution", 0.0)
    if dense and dense_ms:  # cuDNN and Inductor may run a 1×1 convolution as a GEMM kernel: only the sum is exact
        lines.append(f"    matmul and convolution together: {dense / 1e12:.2f} TFLOP in {dense_ms:.1f} ms = "
                     f"{dense / dense_ms / 1e9:.0f} TFLOP/s, {100 * dense / dense_ms / 1e9 / peak:.0f}% of peak")
    total = sum(flops.values())
    lines.append(f"    whole step: {total / 1e12:.2f} TFLOP in {step_ms:.1f} ms = {total / step_ms / 1e9:.0f} TFLOP/s, "
                 f"{100 * total / step_ms / 1e9 / peak:.0f}% of the {peak:.0f} TFLOP/s fp16 matmul peak")
    return "\n".join(lines)


def profile(setup: str, args, peak: float) -> None:
    torch._dynamo.reset()
    model = random_model(args.model).to(CUDA, torch.float16)
    flops = flops_by_kind(model, args)
    chosen, detail = processor(setup, model, args)
    model.unet.set_attn_processor(chosen)
    if args.triton_norms:
        from triton_groupnorm import convert  # this script's folder
        convert(model)
    model.optimise(fuse_qkv=not args.no_fuse, fp8=args.fp8, channels_last=not (args.eager or args.contiguous),
                   compile_mode=None if args.eager else args.mode)
    x, embeds, added = random_unet_inputs(model, args.latents, args.size, args.size)
    t = torch.tensor(500, device=CUDA)

    def step():
        return model.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added)

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad():
        step(), step()  # warm-up (and compile)
        ms = time_cuda_ms(step, warmup=1, repeats=5)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
    events = prof.key_averages()
    busy_ms = sum(e.self_device_time_total for e in kernels(events)) / 1e3
    syncs = ", ".join(f"{e.key} x{e.count}" for e in events if e.key in SYNCS) or "none"
    print(f"=== {setup}: {ms:.1f} ms per step; GPU kernels {busy_ms:.1f} ms; host calls: {syncs}", flush=True)
    print(kinds_table(events, flops, ms, peak), flush=True)
    print(f"    kernels of at least 0.2 ms per step:\n{kernel_list(events, 0.2)}", flush=True)
    print(f"    {detail}\n{events.table(sort_by='cuda_time_total', row_limit=args.rows, max_name_column_width=70)}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--latents", type=int, default=64, help="UNet batch (images x 2 with CFG)")
    parser.add_argument("--setups", default="sdpa,xformers")
    parser.add_argument("--eager", action="store_true", help="no torch.compile, no channels-last (as bench_attention)")
    parser.add_argument("--no-fuse", action="store_true", help="leave the QKV projections unfused")
    parser.add_argument("--contiguous", action="store_true", help="compiled without channels-last (as --mlperf runs)")
    parser.add_argument("--fp8", action="store_true", help="the UNet's linears in FP8, as dtype=fp8 runs them")
    parser.add_argument("--triton-norms", action="store_true", help="GroupNorm+SiLU by sdbatch's Triton passes")
    parser.add_argument("--mode", default="default", help="torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--rows", type=int, default=22, help="kernels listed per setup")
    args = parser.parse_args()
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.model} {args.size}², "
          f"{args.latents} latents, {'eager' if args.eager else 'compiled ' + args.mode}{', fp8' if args.fp8 else ''}"
          f"{', Triton GroupNorms' if args.triton_norms else ''}; "
          f"fp16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    for setup in args.setups.split(","):
        profile(setup, args, peak)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
