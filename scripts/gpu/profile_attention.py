"""One compiled SD1.5 UNet step (batch 32 images, 64 latents with CFG) with each attention backend, set up as a run
sets it up (fused projections, channels-last, torch.compile): step time and the CUDA kernels that take it.

    source scripts/gpu/setup.sh && python scripts/gpu/profile_attention.py
"""

import torch
from omegaconf import OmegaConf

from sdbatch import attention
from sdbatch.benchmark import time_cuda_ms
from sdbatch.models import random_model, random_unet_inputs

CUDA = torch.device("cuda")
SETUPS = [("sdpa", True), ("xformers", True), ("xformers", False)]  # (backend, fuse_qkv)


def profile(name: str, fuse_qkv: bool) -> None:
    torch._dynamo.reset()
    model = random_model("sd15").to(CUDA, torch.float16)
    choice = attention.choose(OmegaConf.create({"name": name}), model, CUDA, torch.float16, 32, 512, 512)
    attention.apply(model, choice)
    model.optimise(fuse_qkv=fuse_qkv, fp8=False, channels_last=True, compile_mode="default")
    x, embeds, _ = random_unet_inputs(model, 64, 512, 512)
    t = torch.tensor(500, device=CUDA)

    def step():
        return model.unet(x, t, encoder_hidden_states=embeds)

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad():
        step(), step()  # compile
        ms = time_cuda_ms(step, warmup=1, repeats=5)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
    print(f"=== {name} fuse_qkv={fuse_qkv}: {ms:.1f} ms per step; {choice.detail}", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    for setup in SETUPS:
        profile(*setup)
        torch.cuda.empty_cache()
