"""One worker process: check the setup, get today's plan and see what is left, all before importing torch (a
mistake or a rerun with nothing to do costs a second); then hand the rendering to sdbatch.job, and summarise."""

import importlib
import importlib.util
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from sdbatch import SdbatchError, settings
from sdbatch.batcher import ShardQueue
from sdbatch.cost import DEVICE_STAGES, cost_lines
from sdbatch.lease import Heartbeat, Holder, remove_tree
from sdbatch.ledger import folder_shards, key_extras, open_folder, saved_settings
from sdbatch.manifest import Defaults, Manifest, lora_problems
from sdbatch.plan import num_shards_for, open_plan
from sdbatch.shard import Context
from sdbatch.weights import LoraFiles, lora_fingerprint, lora_problem, model_revision
from sdbatch.workers import local_worker, resolve_worker
from sdbatch.writer import ImageFormat

log = logging.getLogger("sdbatch")
STAGES = ("text_encode_s", "denoise_s", "vae_decode_s", "write_s")


@dataclass
class Prepared:
    """What the worker settled before importing torch."""
    ctx: Context
    queue: ShardQueue
    device: str  # cpu | cuda | cuda:N
    dtype: str  # fp16 | bf16 | fp32
    run_loras: list
    image_format: ImageFormat
    lora_files: LoraFiles
    start: float


def run(cfg) -> int:
    """Render this worker's share of the manifest (and help with the rest); returns the process exit code."""
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "prompts"):
        raise SdbatchError("No manifest given: pass prompts=PATH to a Parquet file with a 'prompt' column.")
    settings.check(cfg)
    output_dir = Path(cfg.output_dir)
    fresh = not output_dir.exists()
    heartbeat = Heartbeat(cfg.lease_s)
    try:
        prepared = prepare(cfg, output_dir, heartbeat, start)
        if prepared.queue.nothing_to_do():  # a rerun with nothing left: no torch, no model
            print_summary(idle_job(prepared), time.perf_counter() - start)
            return 0
        from sdbatch.job import render  # torch, diffusers and the model: only now
        return render(prepared)
    except SdbatchError:
        if fresh:
            discard_fresh_folder(output_dir)
        raise
    finally:
        heartbeat.stop()


def prepare(cfg, output_dir: Path, heartbeat: Heartbeat, start: float) -> Prepared:
    """Which worker this is, the run-level settings (checked against the folder's), today's plan and its bad rows."""
    worker = local_worker(resolve_worker(cfg.worker_index, cfg.num_workers, os.environ),
                          int(os.environ.get("SDBATCH_LOCAL_RANK", 0)), int(os.environ.get("SDBATCH_LOCAL_COUNT", 1)))
    device = device_name(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
    check_output_dir(output_dir)
    run_loras = run_level_loras(cfg.lora)
    manifest = Manifest(cfg.prompts, settings.max_steps(cfg)[0], settings.min_image_size(cfg.model))
    for warning in manifest.misspelled():
        log.warning("%s: %s", cfg.prompts, warning)
    width, height = cfg.width or cfg.model.width, cfg.height or cfg.model.height
    options = cfg.scheduler.get("options")
    image_format = ImageFormat.from_config(cfg)
    loras = [{"sha256": lora["sha256"], "scale": lora["scale"]} for lora in run_loras]
    extras = key_extras(dtype, cfg.scheduler.name, OmegaConf.to_container(options) if options is not None else {},
                        asdict(image_format), loras, cfg.vae_dtype)
    run_level = {**model_identity(cfg.model, output_dir), "scheduler": cfg.scheduler.name, "steps": cfg.steps,
                 "width": width, "height": height, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
                 "negative_prompt": cfg.negative_prompt, "extras": extras}
    num_shards = folder_shards(output_dir) or num_shards_for(manifest.num_rows, cfg.shard_size)
    open_folder(output_dir, run_level, num_shards, cfg.overwrite, cfg.shard_size, check_only=True)
    holder = Holder.this_process(f"worker {worker.index} of {worker.count}")
    keep_bytecode(run_cache(cfg, output_dir))  # before torch is imported, on the planning thread or later
    plan = open_plan(manifest, output_dir, num_shards, run_level, holder, cfg.lease_s, heartbeat, warm_imports)
    problems, lora_files = plan.problems, LoraFiles()
    problems.kinds.update(lora_problems(plan.loras, lora_files.problem).kinds)
    if problems.count and cfg.on_invalid == "error":
        raise SdbatchError(problems.message(cfg.prompts))
    defaults = Defaults(steps=cfg.steps, guidance_scale=cfg.guidance_scale, width=width, height=height,
                        seed=cfg.seed, negative_prompt=cfg.negative_prompt)
    ctx = Context(cfg, output_dir, worker, holder, heartbeat, plan, defaults, cfg.scheduler.name, run_level["model"],
                  extras, image_format.suffix, lora_state=lora_files.state,
                  bad_loras={path: f"lora file {lora_files.problem(path)}: {path}" for path in plan.loras
                             if lora_files.problem(path)})
    ctx.run_level = run_level  # the job records it in sdbatch.json once the model has loaded
    return Prepared(ctx, ShardQueue(ctx, cfg.steal), device, dtype, run_loras, image_format, lora_files, start)


def warm_imports() -> None:
    """A new plan means work to render, and planning a big manifest is seconds of mostly Arrow work that lets go
    of the GIL, or of waiting for the worker that plans it (every other task of an array): import torch, diffusers
    and the rest of sdbatch.job meanwhile, on a thread (12 s on an H100 machine)."""
    threading.Thread(target=importlib.import_module, args=("sdbatch.job",), name="sdbatch-imports",
                     daemon=True).start()


def run_cache(cfg, output_dir: Path) -> Path:
    """What the run's array tasks and reruns share: the compile caches, the attention timings, Python's bytecode."""
    return Path(cfg.compile_cache or output_dir / ".cache" / "torch").absolute()


def keep_bytecode(cache: Path, probe: str = "torch") -> None:
    """Python's bytecode for torch, diffusers and what they import kept in the run's cache folder, where the
    environment has none beside torch's sources: a container image built without it, usually with
    PYTHONDONTWRITEBYTECODE=1 too, makes every process compile thousands of modules again (imports took 14.3-14.6 s
    on an H200 machine, 9.0-12.8 s once the bytecode was kept, 4 s on a 2-core CPU box). CPython writes each file
    under a temporary name and renames it, and checks it against its source's size and time, so array tasks on many
    hosts can share the folder. A PYTHONPYCACHEPREFIX of the user's own is left as it is."""
    if sys.pycache_prefix is not None:
        return
    spec = importlib.util.find_spec(probe)
    if spec is None or spec.cached is None or os.path.exists(spec.cached):  # cached: where its bytecode would be
        return
    sys.pycache_prefix = str(cache / "bytecode")
    sys.dont_write_bytecode = False
    log.info("%s has no Python bytecode beside its sources: keeping it in %s", probe, sys.pycache_prefix)


def device_name(device: str) -> str:
    """device=auto as cuda or cpu, found without torch where the machine says (CUDA_VISIBLE_DEVICES, nvidia-smi)."""
    if device != "auto":
        return device
    from sdbatch.launch import visible_gpus
    return "cuda" if visible_gpus() else "cpu"


def idle_job(prepared: Prepared) -> SimpleNamespace:
    """What print_summary reads, for a worker that found nothing to render."""
    return SimpleNamespace(ctx=prepared.ctx, queue=prepared.queue, seconds=dict.fromkeys(STAGES, 0.0),
                           batch_sizes=[], stop=threading.Event(), stop_code=0)


def model_identity(model_cfg, output_dir: Path) -> dict:
    """The model in content keys: its weights' revision (where they are plus a fingerprint of their content). A
    folder the first sdbatch made identified weights by the path given; there that path stays the identity, so
    its images stay valid, and the fingerprint recorded beside it catches new weights from now on."""
    revision = model_revision(model_cfg)
    saved = saved_settings(output_dir)
    legacy = saved.get("model")
    if (isinstance(legacy, str) and not legacy.startswith("random:") and " sha256:" not in legacy
            and os.path.realpath(legacy) == revision.split(" sha256:")[0]
            and saved.get("weights", revision) == revision):
        return {"model": legacy, "weights": revision}
    return {"model": revision}


def check_output_dir(output_dir: Path) -> None:
    """output_dir must be a folder this process can write (or one it can create), checked before any work."""
    existing = next((p for p in [output_dir, *output_dir.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise SdbatchError(f"output_dir={output_dir} cannot be used: {existing} is a file, not a folder.")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise SdbatchError(f"output_dir={output_dir} cannot be written: this user may not write to {existing}. "
                           "Choose another output_dir, or fix its permissions.")


def discard_fresh_folder(output_dir: Path) -> None:
    """An error before anything was rendered into a folder this run created: leave no trace of it."""
    if output_dir.is_dir() and not (output_dir / "images").exists() and not (output_dir / "ledger").exists():
        remove_tree(output_dir)


def run_level_loras(items) -> list[dict]:
    """The run's `lora` setting as [{path, scale, sha256}], each file checked (settings.check checked the shape)."""
    loras = []
    for i, item in enumerate(OmegaConf.to_container(items) if items is not None else []):
        path, scale = str(item["path"]), item.get("scale")
        scale = 1.0 if scale is None else float(scale)
        problem = lora_problem(path)
        if problem:
            raise SdbatchError(f"lora[{i}].path={path}: the file {problem}. Point it at a LoRA .safetensors file "
                               "(diffusers/PEFT or kohya layout), or remove it from `lora`.")
        loras.append({"path": path, "scale": scale, "sha256": lora_fingerprint(path)})
    return loras



def print_summary(job, wall_s: float) -> None:
    """The closing lines of a worker: what it rendered, what it found, where the time went (job: a Job, or idle_job)."""
    c, stats = job.ctx.counts, job.queue.stats
    pruned = f" ({c['pruned']} images pruned)" if c["pruned"] else ""
    rendered = c["ok"] + c["failed"]
    stage_total = sum(job.seconds.values()) or 1.0
    shares = ", ".join(f"{s.removesuffix('_s').replace('_', ' ')} {100 * job.seconds[s] / stage_total:.0f}%"
                       for s in STAGES)
    mean_batch = sum(job.batch_sizes) / len(job.batch_sizes) if job.batch_sizes else 0
    worker = job.ctx.worker
    again = "".join(f", {c[k]} {words}" for k, words in (("retried", "failed before and retried"),
                                                        ("missing", "re-rendered (file was missing)")) if c[k])
    lines = [
        f"sdbatch worker {worker.index}/{worker.count}: {rendered} images rendered ({c['failed']} failed) "
        f"in {wall_s:.1f}s, {rendered / wall_s:.2f} images/s, mean batch {mean_batch:.1f}",
        f"  images: {c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged, {c['removed']} removed"
        f"{pruned}, {c['recovered']} recovered from an earlier run{again}",
        f"  shards: {stats['own']} of its own rendered, {stats['helped']} of other workers' rendered"
        + (f", {stats['own done by others']} of its own completed by other workers" if stats["own done by others"]
           else ""),
        f"  stage time: {shares}",
    ]
    on_gpu = job.ctx.ledger_fields.get("device", "").startswith("cuda")
    gpu_seconds = sum(job.seconds[s] for s in DEVICE_STAGES) if on_gpu else 0.0
    lines += [f"  {line}" for line in cost_lines(c["ok"], gpu_seconds, job.ctx.cfg.gpu_hour_cost)]
    if c["skipped"]:
        named = ", ".join(job.ctx.skipped_names[:5]) + (", ..." if c["skipped"] > 5 else "")
        lines.append(f"  {c['skipped']} invalid row(s) recorded as skipped ({named}); the ledger's reason column "
                     "says why")
    if job.stop.is_set():
        lines.append(f"  interrupted: rerun the same command to continue (exit code {job.stop_code})")
    print("\n".join(lines), file=sys.stdout, flush=True)
