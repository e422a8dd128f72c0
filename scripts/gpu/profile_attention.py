"""One UNet step with each attention setup, set up as a run sets it up (fused projections, channels-last, and
torch.compile unless --eager): step time, how much of it the GPU was busy, host syncs, and the CUDA kernels.

    source scripts/gpu/setup.sh && python scripts/gpu/profile_attention.py                      # SD1.5, compiled
    python scripts/gpu/profile_attention.py --model sdxl --size 1024 --latents 16 --eager \\
        --setups stock,sdpa,sdpa/auto,xformers

A setup is `stock` (diffusers' AttnProcessor2_0), `stock-xformers` (its XFormersAttnProcessor), or an sdbatch
attention setting `name[/kernel-or-op]` (`sdpa` chooses a kernel per shape, `sdpa/auto` leaves it to PyTorch).
"""

import argparse

import torch
from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import time_cuda_ms
from sdbatch.models import random_model, random_unet_inputs

CUDA = torch.device("cuda")
STOCK = {"stock": AttnProcessor2_0, "stock-xformers": XFormersAttnProcessor}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def processor(setup: str, model, args):
    if setup in STOCK:
        return STOCK[setup](), "diffusers' stock processor"
    name, _, kernel = setup.partition("/")
    cfg = {"name": name, **({"op" if name == "xformers" else "kernel": kernel} if kernel else {})}
    images = args.latents // 2
    choice = attention.choose(OmegaConf.create(cfg), model, CUDA, torch.float16, images, args.size, args.size)
    return attention.DispatchProcessor(choice), choice.detail


def profile(setup: str, args) -> None:
    torch._dynamo.reset()
    model = random_model(args.model).to(CUDA, torch.float16)
    chosen, detail = processor(setup, model, args)
    model.unet.set_attn_processor(chosen)
    model.optimise(fuse_qkv=not args.no_fuse, fp8=False, channels_last=not args.eager,
                   compile_mode=None if args.eager else "default")
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
    busy_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    syncs = ", ".join(f"{e.key} x{e.count}" for e in events if e.key in SYNCS) or "none"
    print(f"=== {setup}: {ms:.1f} ms per step; GPU kernels {busy_ms:.1f} ms; host calls: {syncs}", flush=True)
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
    parser.add_argument("--rows", type=int, default=22, help="kernels listed per setup")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {args.model} {args.size}², "
          f"{args.latents} latents, {'eager' if args.eager else 'compiled'}", flush=True)
    for setup in args.setups.split(","):
        profile(setup, args)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
