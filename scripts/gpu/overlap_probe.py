"""Does decoding batch n on a second CUDA stream, under batch n+1's UNet steps, shorten a batch? SDXL at MLPerf's
shapes (8 images, CFG doubled to 16 latents, 20 steps, a bf16 VAE decoding in chunks of 8), compiled as a run
compiles it, timed as serial batches (UNet steps, then decode, one stream) against overlapped ones (the previous
batch's decode queued on a side stream before this batch's steps).

    source scripts/gpu/setup.sh && python scripts/gpu/overlap_probe.py --out overlap.json
"""

import argparse
import json
import sys

import torch

from sdbatch.benchmark import time_cuda_ms
from sdbatch.models import random_model, random_unet_inputs

CUDA = torch.device("cuda")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=4,
                        help="batches per timed run (an overlapped run's last decode has nothing to hide under)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_model(args.model).to(CUDA, torch.float16, vae_dtype=torch.bfloat16)
    model.optimise(fuse_qkv=True, fp8=False, channels_last=True, compile_mode="default")
    x, embeds, added = random_unet_inputs(model, 2 * args.images, args.size, args.size)
    t = torch.tensor(999, device=CUDA)
    side = torch.cuda.Stream()

    def steps():
        latents = x[:args.images]
        for _ in range(args.steps):
            noise = model.unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                               return_dict=False)[0]
            latents = latents - 0.01 * noise[:args.images]
        return latents

    def decode(latents):
        return model.vae.decode(latents.to(model.vae.dtype), return_dict=False)[0]

    def serial():
        for _ in range(args.batches):
            decode(steps())

    def decode_aside(latents):
        side.wait_stream(torch.cuda.current_stream())  # the latents are ready
        with torch.cuda.stream(side):
            decode(latents)
        latents.record_stream(side)

    def overlapped():
        latents = steps()
        for _ in range(args.batches - 1):
            decode_aside(latents)  # queued before the next batch's steps, so it runs under them
            latents = steps()
        decode_aside(latents)
        torch.cuda.current_stream().wait_stream(side)

    with torch.no_grad():
        latents = steps()
        decode(latents)  # compile both before timing
        times = {"unet_steps_ms": time_cuda_ms(steps, warmup=1, repeats=5),
                "decode_ms": time_cuda_ms(lambda: decode(latents), warmup=1, repeats=5),
                "serial_batch_ms": time_cuda_ms(serial, warmup=0, repeats=3) / args.batches,
                "overlapped_batch_ms": time_cuda_ms(overlapped, warmup=0, repeats=3) / args.batches}
    times["saved"] = 1 - times["overlapped_batch_ms"] / times["serial_batch_ms"]
    print(json.dumps(times, indent=1), flush=True)
    if args.out:
        report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "command": " ".join(["python", *sys.argv]), **times}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
