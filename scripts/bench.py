"""Throughput benchmark: sdbatch end to end against diffusers' pipeline, all in one process on one GPU, with the
same random-weight full-size model and the same prompts.

    python scripts/bench.py --model sd15 --size 512 --steps 50 --out docs/benchmarks/h200.json
    python scripts/bench.py --smoke --out /tmp/bench.json          # CPU smoke test (model=tiny; numbers meaningless)
    python scripts/bench.py --mlperf --out docs/benchmarks/h100-mlperf-sdxl.json   # MLPerf Inference's SDXL settings

--mlperf: SDXL base at 1024x1024, EulerDiscrete, 20 steps, CFG 8, MLPerf's fixed negative prompt, MLPerf's own batch
of 32 prompts per UNet call unless --batch says otherwise (48.5 GiB peak on an H100; 8 gave 3-5% fewer images/s); rows
diffusers-sdpa-best, sdbatch-fp16-sdpa (eager), and compiled: sdbatch-fp16-best, sdbatch-fp16-best-vae-bf16 (the
VAE in bf16 instead of fp32), sdbatch-fp8-best-vae-bf16; sdbatch-fp8-best (fp8 with the fp32 VAE) on request.

Rows: diffusers-vanilla-b1, diffusers-xformers-b1, diffusers-sdpa-best (best of 16/32 prompts per call),
sdbatch-xformers, sdbatch-sdpa, sdbatch-best. Per row: images/s (steady state, after the first call or batch),
peak GPU memory, time to first image (load + compile + first batch). Also the fp16 matmul TFLOP/s of this run and the
UNet's MFU against it (sdbatch rows: from the ledger's denoising time per step).
"""

import argparse
import gc
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdbatch import log_to_stderr  # noqa: E402
from sdbatch.benchmark import matmul_peak_tflops, unet_flops_per_latent  # noqa: E402
from sdbatch.models import load_model  # noqa: E402
from sdbatch.render import make_scheduler  # noqa: E402
from sdbatch.run import run  # noqa: E402

MLPERF_NEGATIVE = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
PROMPTS = [f"studio product photo of item {i}: a {c} {o} on a white background, soft light"
           for i, (c, o) in enumerate((c, o) for o in ("vase", "handbag", "sneaker", "lamp", "mug", "chair", "watch",
                                                          "backpack") for c in ("red", "blue", "green", "black"))]


def config(overrides):
    with initialize_config_dir(config_dir=str(REPO / "sdbatch" / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def cuda() -> bool:
    return torch.cuda.is_available()


def reset_memory():
    gc.collect()
    if cuda():
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if cuda() else None


def sync():
    if cuda():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- diffusers rows
def diffusers_row(name, args, model_cfg, processor, prompts_per_call, images):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    reset_memory()
    start = time.perf_counter()
    model = load_model(model_cfg)
    device, dtype = (torch.device("cuda"), torch.float16) if cuda() else (torch.device("cpu"), torch.float32)
    model.to(device, dtype)
    model.vae.to(dtype)  # diffusers' SDXL pipeline upcasts its fp16 VAE itself
    scheduler = make_scheduler(config([f"scheduler={args.scheduler}"]).scheduler, model.scheduler_config)
    parts = dict(vae=model.vae, unet=model.unet, scheduler=scheduler, text_encoder=model.text_encoders[0],
                 tokenizer=model.tokenizers[0])
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1], **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(processor)
    pipe.vae.set_attn_processor(processor)
    calls, done, first_image_s, steady_start = max(2, images // prompts_per_call), 0, None, None
    for call in range(calls):
        prompts = [PROMPTS[(done + i) % len(PROMPTS)] for i in range(prompts_per_call)]
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
             negative_prompt=[args.negative] * prompts_per_call,
             generator=[torch.Generator().manual_seed(done + i) for i in range(prompts_per_call)], output_type="pil")
        sync()
        done += prompts_per_call
        if call == 0:
            first_image_s = time.perf_counter() - start
            steady_start = time.perf_counter()
    steady = (done - prompts_per_call) / (time.perf_counter() - steady_start)
    row = {"name": name, "images_per_s": steady, "peak_mem_gib": peak_gib(), "time_to_first_image_s": first_image_s,
           "images": done, "prompts_per_call": prompts_per_call}
    del pipe, model
    return row


# ---------------------------------------------------------------- sdbatch rows
def run_overrides(args, name, images, work: Path) -> tuple[list, Path]:
    """A manifest of `images` rows and the overrides every sdbatch row shares (model, size, sampler, prompts)."""
    manifest = work / f"{name}.parquet"
    pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(images)],
                             "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(images)]}), manifest)
    out = work / name
    return [f"prompts={manifest}", f"output_dir={out}", f"model={args.model}", f"steps={args.steps}",
            f"width={args.size}", f"height={args.size}", "progress=false", f"scheduler={args.scheduler}",
            f"guidance_scale={args.guidance}", f"negative_prompt='{args.negative}'", *args.model_overrides], out


def ledger_rows(out: Path, images: int, name: str) -> list[dict]:
    rows = sorted((r for f in (out / "ledger").glob("*.parquet") for r in pq.read_table(f).to_pylist()),
                  key=lambda r: r["finished_at"])
    assert len(rows) == images and all(r["status"] == "ok" for r in rows), f"{name}: not every image rendered"
    return rows


def first_batch_extra_s(rows: list[dict], batch: int) -> dict:
    """Seconds the first batch spent per stage beyond a steady one: compiling, or loading the compile cache."""
    def stage(name, part):
        return sum(r[name] for r in part)
    return {name.removesuffix("_s"): stage(name, rows[:batch]) - stage(name, rows[batch:2 * batch])
            for name in ("text_encode_s", "denoise_s", "vae_decode_s")}


def sdbatch_row(name, args, overrides, images, work: Path):
    reset_memory()
    shared, out = run_overrides(args, name, images, work)
    start = time.time()
    code = run(config([*shared, *overrides]))
    assert code == 0, f"{name}: sdbatch exited {code}"
    rows = ledger_rows(out, images, name)
    batch = rows[0]["batch_size"]
    first, last = rows[batch - 1]["finished_at"], rows[-1]["finished_at"]
    steady = (images - batch) / (last - first).total_seconds()
    load_s = rows[0]["finished_at"].timestamp() - start  # load + compile + first batch
    step_s = sum(r["denoise_s"] for r in rows[batch:]) / (images - batch) * batch / args.steps  # per UNet step
    row = {"name": name, "images_per_s": steady, "peak_mem_gib": peak_gib(), "time_to_first_image_s": load_s,
           "images": images, "batch_size": batch, "unet_step_ms": 1000 * step_s,
           "first_batch_extra_s": first_batch_extra_s(rows, batch),
           "attention_backend": rows[-1]["attention_backend"], "overrides": overrides}
    shutil.rmtree(out, ignore_errors=True)
    return row


STARTED = re.compile(r"([\d.]+)s after start: model loaded in ([\d.]+)s, attention chosen in ([\d.]+)s")


def warm_start_row(args, overrides, images, work: Path):
    """The best setup again as new processes through the CLI, reusing the compile cache the cold row filled: what a
    rerun or another array task pays before its first image, split into its parts. Two processes, each with its own
    output folder: the first also keeps Python's bytecode in the cache where the environment has none
    (`sdbatch.run.keep_bytecode`), as a run's first array task does; the row is the second, as every later task."""
    first, later = (warm_process(args, overrides, images, work, f"warm{n}") for n in (1, 2))
    return {"name": "sdbatch-best-warm-start", **later,
            "first_process": {k: first[k] for k in ("time_to_first_image_s", "startup_split_s")},
            "note": "the second new process (imports included) on the compile cache from the cold row; first_process: "
                    "the one before it, which kept Python's bytecode where the environment has none; "
                    "startup_split_s: before_worker_clock = interpreter and CLI start (and the set-up between the "
                    "attention choice and the first batch), imports_and_plan = the worker's clock until the model "
                    "load, first_batch_extra = the first batch's time per stage beyond a steady batch's (loading the "
                    "compile cache)"}


def warm_process(args, overrides, images, work: Path, name: str) -> dict:
    shared, out = run_overrides(args, name, images, work)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "sdbatch", *shared, *overrides], cwd=REPO, capture_output=True,
                          text=True)
    print(done.stderr[-4000:], flush=True)
    assert done.returncode == 0, f"warm start: sdbatch exited {done.returncode}"
    rows = ledger_rows(out, images, "warm start")
    batch = rows[0]["batch_size"]
    steady = (len(rows) - batch) / (rows[-1]["finished_at"] - rows[batch - 1]["finished_at"]).total_seconds()
    first_image_s = rows[0]["finished_at"].timestamp() - start
    started = STARTED.search(done.stderr)
    split = {}
    if started:
        ready, model_s, attention_s = map(float, started.groups())
        first_batch_s = sum(r[k] for r in rows[:batch] for k in ("text_encode_s", "denoise_s", "vae_decode_s"))
        split = {"before_worker_clock": first_image_s - ready - first_batch_s,
                 "imports_and_plan": ready - model_s - attention_s, "model_load": model_s,
                 "attention_choice": attention_s, "first_batch": first_batch_s,
                 "first_batch_extra": first_batch_extra_s(rows, batch)}
    return {"images_per_s": steady, "peak_mem_gib": None, "images": len(rows), "time_to_first_image_s": first_image_s,
            "batch_size": batch, "startup_split_s": split}


_WORK = []


def work_dir() -> Path:
    if not _WORK:
        _WORK.append(Path(tempfile.mkdtemp(prefix="sdbatch-bench-")))
    return _WORK[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=160, help="images per sdbatch row")
    parser.add_argument("--batch", type=int, help="sdbatch batch size (images; default 32)")
    parser.add_argument("--best", help="overrides of the sdbatch-best rows (default: attention=auto compile=true "
                        "channels_last=true)")
    parser.add_argument("--b1-images", type=int, default=4, help="images of the one-prompt-per-call diffusers rows")
    parser.add_argument("--diffusers-batches", default="16,32", help="prompts per call tried for diffusers-sdpa-best")
    parser.add_argument("--rows", default="all", help="comma-separated row names to run (default all)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: model=tiny, few steps and images")
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--negative", default="")
    parser.add_argument("--mlperf", action="store_true", help="MLPerf Inference's SDXL settings and rows")
    parser.add_argument("--compile-cache", help="the sdbatch-best rows' compile cache (default: a new folder, removed at "
                        "the end); one a previous invocation filled measures warm processes across settings")
    parser.add_argument("--out", default="docs/benchmarks/h200.json")
    args = parser.parse_args()
    # sdbatch's own progress (model loaded, attention chosen, batches) to stderr: a row that runs long shows where
    log_to_stderr()
    if args.mlperf:
        args.model, args.size, args.steps, args.scheduler, args.guidance = "sdxl", 1024, 20, "euler", 8.0
        args.negative, args.diffusers_batches = MLPERF_NEGATIVE, "8"
        if args.rows == "all":
            args.rows = ("diffusers-sdpa-best,sdbatch-fp16-sdpa,sdbatch-fp16-best,sdbatch-fp16-best-vae-bf16,"
                         "sdbatch-fp8-best-vae-bf16")
    args.batch = args.batch or 32
    args.best = args.best or "attention=auto compile=true channels_last=true"
    if args.smoke:
        args.model, args.size, args.steps, args.images, args.batch = "tiny", 64, 2, 8, 4
    args.model_overrides = [] if args.model == "tiny" else ["model.random_weights=true"]
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor
    model_cfg = config([f"model={args.model}", *args.model_overrides]).model
    gpu = torch.cuda.get_device_name() if cuda() else "cpu"
    peak = matmul_peak_tflops() if cuda() else None
    report = {"gpu": gpu, "matmul_tflops": peak, "command": "python " + " ".join(sys.argv), "model": args.model,
              "size": args.size, "steps": args.steps, "guidance_scale": args.guidance, "scheduler": args.scheduler,
              "negative_prompt": args.negative,
              "versions": {"torch": torch.__version__}, "rows": []}
    b1_images = 2 if args.smoke else args.b1_images
    cache = args.compile_cache or work_dir() / "compile-cache"
    best = [*args.best.split(), f"batch_size={args.batch}", f"compile_cache={cache}"]
    xformers_ok = cuda()
    plan = [
        ("diffusers-vanilla-b1", lambda: diffusers_row("diffusers-vanilla-b1", args, model_cfg, AttnProcessor(), 1, b1_images)),
        ("diffusers-xformers-b1", lambda: diffusers_row("diffusers-xformers-b1", args, model_cfg, XFormersAttnProcessor(), 1, b1_images)),
        ("diffusers-sdpa-best", lambda: max((diffusers_row("diffusers-sdpa-best", args, model_cfg, AttnProcessor2_0(), n, 2 * n)
                                             for n in ((2,) if args.smoke else map(int, args.diffusers_batches.split(",")))),
                                            key=lambda r: r["images_per_s"])),
        ("sdbatch-xformers", lambda: sdbatch_row("sdbatch-xformers", args, ["attention=xformers", f"batch_size={args.batch}"], args.images, work)),
        ("sdbatch-sdpa", lambda: sdbatch_row("sdbatch-sdpa", args, ["attention=sdpa", f"batch_size={args.batch}"], args.images, work)),
        ("sdbatch-best", lambda: sdbatch_row("sdbatch-best", args, best, args.images, work)),
        ("sdbatch-fp16-sdpa", lambda: sdbatch_row("sdbatch-fp16-sdpa", args, ["attention=sdpa", "dtype=fp16", f"batch_size={args.batch}"], args.images, work)),
        ("sdbatch-fp16-best", lambda: sdbatch_row("sdbatch-fp16-best", args, [*best, "dtype=fp16"], args.images, work)),
        ("sdbatch-fp16-best-vae-bf16", lambda: sdbatch_row("sdbatch-fp16-best-vae-bf16", args, [*best, "dtype=fp16", "vae_dtype=bf16"], args.images, work)),
        ("sdbatch-fp8-best", lambda: sdbatch_row("sdbatch-fp8-best", args, [*best, "dtype=fp8"], args.images, work)),
        ("sdbatch-fp8-best-vae-bf16", lambda: sdbatch_row("sdbatch-fp8-best-vae-bf16", args, [*best, "dtype=fp8", "vae_dtype=bf16"], args.images, work)),
        ("sdbatch-best-warm-start", lambda: warm_start_row(args, best, 2 * args.batch, work)),
    ]
    work = work_dir()
    for name, measure in plan:
        if args.rows != "all" and name not in args.rows.split(","):
            continue
        if "xformers" in name and not xformers_ok:
            print(f"{name}: skipped (xformers needs a CUDA GPU)", flush=True)
            continue
        row = measure()
        report["rows"].append(row)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # what is measured survives a timeout
        print(f"{name:24s} {row['images_per_s']:6.2f} images/s  first image {row['time_to_first_image_s']:6.1f}s  "
              f"peak {row['peak_mem_gib'] or 0:5.1f} GiB", flush=True)
    if cuda():
        model = load_model(model_cfg).to(torch.device("cuda"), torch.float16)
        flops_per_latent = unet_flops_per_latent(model, args.size, args.size)
        report["unet_tflop_per_latent_step"] = flops_per_latent / 1e12
        for row in report["rows"]:
            if "unet_step_ms" in row:
                row["unet_mfu"] = flops_per_latent * 2 * row["batch_size"] / (row["unet_step_ms"] / 1000) / 1e12 / peak
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)
    print(markdown_table(report))


def markdown_table(report) -> str:
    lines = [f"{report['gpu']}, {report['model']} {report['size']}x{report['size']}, {report['steps']} "
             f"{report['scheduler']} steps, CFG {report['guidance_scale']:g}; fp16 matmul "
             f"{report['matmul_tflops'] or 0:.0f} TFLOP/s", "",
             "| setup | images/s | peak GiB | first image s | UNet MFU |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        mfu = f"{row['unet_mfu']:.0%}" if row.get("unet_mfu") else ""
        peak = f"{row['peak_mem_gib']:.1f}" if row.get("peak_mem_gib") else ""
        lines.append(f"| {row['name']} | {row['images_per_s']:.2f} | {peak} | "
                     f"{row['time_to_first_image_s']:.1f} | {mfu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
