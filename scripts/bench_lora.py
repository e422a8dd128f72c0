"""What per-row LoRAs cost: milliseconds per adapter switch, and the UNet step with and without an adapter, eager
(peft adapters switched with set_adapters) and compiled (one slot whose weights are copied in), on random weights
with two random LoRAs made here (attention projections of the UNet and the text encoder, --rank).

    python scripts/bench_lora.py --out docs/benchmarks/lora-h100.json            # SD1.5, 512, batch 16, on the GPU
    python scripts/bench_lora.py --model tiny --steps 2 --out /tmp/lora.json     # CPU smoke test (numbers meaningless)

Rows, per mode: `base` (no LoRA anywhere), `lora` (a row's LoRA on), `no-lora row` (a row without one while LoRAs
are loaded: adapters disabled, or the slot zeroed), `switch` (one activate() between two LoRAs, and to none; the
text encoders' adapters included), `first load` (reading a LoRA file and loading it). Compiled rows also give the
compile time and how many times the UNet was compiled again after switching (0 is the point).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdbatch import attention  # noqa: E402
from sdbatch.lora import Adapters  # noqa: E402
from sdbatch.manifest import ImageJob  # noqa: E402
from sdbatch.models import random_model, random_unet_inputs, tiny_model  # noqa: E402
from sdbatch.weights import lora_fingerprint  # noqa: E402

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # what most SD LoRAs train (kohya's default for SD1.5)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_model(name: str, device: torch.device, dtype: torch.dtype, batch: int, size: int):
    model = (tiny_model() if name == "tiny" else random_model(name)).to(device, dtype)
    choice = attention.choose(OmegaConf.create({"name": "sdpa"}), model, device, dtype, batch, size, size)
    attention.apply(model, choice)
    return model


def random_lora(model, rank: int, seed: int, path: Path) -> Path:
    """A LoRA for the model's UNet and first text encoder with random weights, saved as diffusers does."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    generator = torch.Generator().manual_seed(seed)

    def layers(module, targets):
        found = {}
        for name, sub in module.named_modules():
            if isinstance(sub, torch.nn.Linear) and name.endswith(targets):
                found[f"{name}.lora_A.weight"] = torch.randn(rank, sub.in_features, generator=generator) * 0.01
                found[f"{name}.lora_B.weight"] = torch.randn(sub.out_features, rank, generator=generator) * 0.01
        return found

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(path.parent), unet_lora_layers=layers(model.unet, UNET_TARGETS),
        text_encoder_lora_layers=layers(model.text_encoders[0], TEXT_TARGETS), weight_name=path.name)
    return path


def job(path: Path | None, scale: float = 1.0) -> ImageJob:
    if path is None:
        return ImageJob("x", 0, "", "", 0, 64, 64, 1, 1.0, {})
    return ImageJob("x", 0, "", "", 0, 64, 64, 1, 1.0, {}, lora=str(path), lora_scale=scale,
                    lora_sha256=lora_fingerprint(str(path)))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn(), the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def step_fn(model, batch: int, size: int):
    x, embeds, added = random_unet_inputs(model, batch, size, size)
    t = torch.tensor(500, device=model.device)

    @torch.no_grad()
    def step():
        model.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added)
    return step


def graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def measure(args, device, dtype, loras, compiled: bool) -> dict:
    """One mode's row: base, lora, no-lora row and switch times on a fresh model."""
    row = {"mode": "compiled" if compiled else "eager"}
    model = make_model(args.model, device, dtype, args.batch, args.size)
    compile_unet = (lambda m: setattr(m, "unet", torch.compile(m.unet, backend=args.backend, dynamic=False))
                    ) if compiled else (lambda m: None)
    plain = make_model(args.model, device, dtype, args.batch, args.size)
    compile_unet(plain)
    started = time.perf_counter()
    step_fn(plain, args.batch, args.size)()
    sync(device)
    if compiled:
        row["base_compile_s"] = time.perf_counter() - started
    row["base_ms"] = timed_ms(step_fn(plain, args.batch, args.size), device, args.steps)
    del plain

    adapters = Adapters(model, slot=compiled)
    started = time.perf_counter()
    adapters.prepare({str(p): lora_fingerprint(str(p)) for p in loras} if compiled else {})
    row["prepare_s"] = time.perf_counter() - started
    compile_unet(model)
    step = step_fn(model, args.batch, args.size)
    started = time.perf_counter()
    adapters.activate(job(loras[0]))
    sync(device)
    row["first_load_ms"] = (time.perf_counter() - started) * 1000
    adapters.activate(job(loras[1]))  # both loaded: the switches below are warm
    started = time.perf_counter()
    step()
    sync(device)
    if compiled:
        row["compile_s"] = time.perf_counter() - started
    row["lora_ms"] = timed_ms(step, device, args.steps)
    adapters.activate(job(None))
    row["no_lora_row_ms"] = timed_ms(step, device, args.steps)

    cycle = [job(loras[0]), job(loras[1], 0.5), job(None)]
    graphs_before, times = graphs(), []
    for i in range(args.switches):
        sync(device)
        start = time.perf_counter()
        adapters.activate(cycle[i % len(cycle)])
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
        step()  # a UNet call after each switch: a recompile would show up here
    sync(device)
    row["switch_ms"] = statistics.median(times)
    row["recompiles"] = graphs() - graphs_before if compiled else None
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="a built-in architecture (random weights), or tiny")
    parser.add_argument("--size", type=int, default=None, help="image size; default the model's native size")
    parser.add_argument("--batch", type=int, default=16, help="UNet batch (latents per call)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed UNet calls per measurement")
    parser.add_argument("--switches", type=int, default=30)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on with a GPU")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick CPU check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # its notes on .to() and adapters, once per model built
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    native = {"tiny": 64, "sd15": 512, "sd21": 768, "sdxl": 1024}
    args.size = args.size or native.get(args.model, 512)
    if args.model == "tiny" and args.batch == 16:
        args.batch = 2
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")

    with tempfile.TemporaryDirectory() as folder:
        probe = make_model(args.model, torch.device("cpu"), torch.float32, 1, 64) if args.model == "tiny" else \
            make_model(args.model, device, dtype, 1, 64)
        loras = [random_lora(probe, args.rank, seed, Path(folder) / f"lora-{seed}.safetensors") for seed in (1, 2)]
        del probe
        rows = [measure(args, device, dtype, loras, compiled=False)]
        if compiled:
            torch._dynamo.reset()
            rows.append(measure(args, device, dtype, loras, compiled=True))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import peft
    report = {"command": " ".join(sys.argv), "device": name, "model": args.model, "size": args.size,
              "batch": args.batch, "rank": args.rank, "dtype": str(dtype).removeprefix("torch."),
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
              "rows": rows}
    print(f"{name}, {args.model} {args.size}x{args.size}, UNet batch {args.batch}, LoRA rank {args.rank} on "
          f"{', '.join(UNET_TARGETS)} (+ text encoder)")
    print("| mode | base ms | LoRA ms | no-LoRA row ms | switch ms | first load ms | recompiles | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        recompiles = "" if r["recompiles"] is None else str(r["recompiles"])
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        print(f"| {r['mode']} | {r['base_ms']:.2f} | {r['lora_ms']:.2f} | {r['no_lora_row_ms']:.2f} | "
              f"{r['switch_ms']:.2f} | {r['first_load_ms']:.1f} | {recompiles} | {compile_s} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
