"""One worker process: validate everything, open the output folder, render this worker's shards, summarise."""

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sdbatch import EXIT_INTERRUPTED, SdbatchError, attention
from sdbatch.ledger import CORE_COLUMNS, ShardLock, content_key, ledger_path, open_folder, read_ledger, write_ledger
from sdbatch.manifest import Defaults, ImageJob, Manifest, read_manifest
from sdbatch.models import load_model, model_revision
from sdbatch.plan import Worker, local_worker, resolve_worker, shard_of, shards_for
from sdbatch.render import Renderer, batch_key
from sdbatch.writer import ImageWriter, a1111_parameters, image_name, read_provenance, remove_temp_files, temp_files

log = logging.getLogger("sdbatch")
LEDGER_FLUSH_S = 30.0  # a running shard's ledger is rewritten at least this often
STAGES = ("text_encode_s", "denoise_s", "vae_decode_s", "write_s")


@dataclass
class Context:
    """What every shard of this worker shares."""
    cfg: object
    output_dir: Path
    worker: Worker
    renderer: Renderer
    writer: ImageWriter
    choice: attention.Choice
    device_label: str
    provenance: dict
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    bar: tqdm | None = None
    current: "ShardRun | None" = None  # the shard being rendered: its ledger is written if a stop times out


def run(cfg) -> int:
    """Render this worker's share of the manifest; returns the process exit code."""
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "prompts"):
        raise SdbatchError("No manifest given: pass prompts=PATH to a Parquet file with a 'prompt' column.")
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    width, height = cfg.width or cfg.model.width, cfg.height or cfg.model.height
    check_run_settings(cfg, width, height)
    defaults = Defaults(steps=cfg.steps, guidance_scale=cfg.guidance_scale, width=width, height=height,
                        seed=cfg.seed, negative_prompt=cfg.negative_prompt)
    manifest = read_manifest(cfg.prompts, defaults, cfg.on_invalid)
    worker = local_worker(resolve_worker(cfg.worker_index, cfg.num_workers, os.environ),
                          int(os.environ.get("SDBATCH_LOCAL_RANK", 0)), int(os.environ.get("SDBATCH_LOCAL_COUNT", 1)))
    if cfg.attention.name != "auto":  # fail before the (slow) model load when the backend cannot run at all
        options = {k: v for k, v in cfg.attention.items() if k != "name"}
        problem = attention.why_not(cfg.attention.name, options, device, dtype)
        if problem:
            raise SdbatchError(problem)
    settings = {"model": model_revision(cfg.model), "scheduler": cfg.scheduler.name, "steps": cfg.steps,
                "width": width, "height": height, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
                "negative_prompt": cfg.negative_prompt}
    output_dir = Path(cfg.output_dir)
    folder_args = (output_dir, settings, manifest.num_rows, cfg.shard_size, cfg.overwrite)
    open_folder(*folder_args, check_only=True)  # refuse a costly settings change before loading anything
    model = load_model(cfg.model).to(device, dtype)
    choice = attention.choose(cfg.attention, model, device, dtype, cfg.batch_size, width, height)
    attention.apply(model, choice)
    num_shards = open_folder(*folder_args)  # the first write to output_dir
    speed_up(model, cfg, output_dir)
    renderer = Renderer(model, cfg.scheduler, pad_to=cfg.batch_size if cfg.compile else None)
    ctx = Context(cfg, output_dir, worker, renderer, ImageWriter(cfg.write_threads), choice,
                  device_label(device), provenance_base(cfg, model, choice))
    log.info("worker %d of %d (%s) on %s, attention %s: shards %s of %d", worker.index, worker.count, worker.source,
             ctx.device_label, choice.label, compact(shards_for(worker, num_shards)), num_shards)
    with stop_on_signals(ctx):
        render_shards(ctx, manifest, num_shards)
    ctx.writer.close()
    print_summary(ctx, time.perf_counter() - start)
    return EXIT_INTERRUPTED if ctx.stop.is_set() else 0


def check_run_settings(cfg, width: int, height: int) -> None:
    problems = [f"{name}={value} must be a positive multiple of 8" for name, value in (("width", width), ("height", height))
                if not isinstance(value, int) or value <= 0 or value % 8]
    problems += [f"{name}={cfg[name]} must be at least 1" for name in ("steps", "batch_size", "shard_size", "write_threads")
                 if not isinstance(cfg[name], int) or cfg[name] < 1]
    if problems:
        raise SdbatchError("Invalid run settings: " + "; ".join(problems) + ".")


def speed_up(model, cfg, output_dir: Path) -> None:
    """GPU levers: cuDNN autotuning (every batch has one static shape), fused projections, torch.compile with a
    compile cache kept in the output folder so array tasks and nightly reruns reuse it."""
    if model.device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if cfg.compile:
        cache = Path(cfg.compile_cache or output_dir / ".cache" / "torch").absolute()
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    model.optimise(cfg.fuse_qkv, cfg.channels_last, cfg.compile_mode if cfg.compile else None)


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdbatchError(f"device={device} was asked for, but torch sees no CUDA GPU here. Use device=cpu or device=auto.")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise SdbatchError(f"dtype={dtype} is not one of auto, {', '.join(dtypes)}.")
    return torch.device(device), dtypes[dtype]


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def provenance_base(cfg, model, choice) -> dict:
    import diffusers
    import transformers
    return {
        "model": {"name": model.name, "family": model.family, "weights": model.revision},
        "scheduler": OmegaConf.to_container(cfg.scheduler),
        "attention": {"backend": choice.label, "detail": choice.detail},
        "dtype": str(model.dtype).removeprefix("torch."),
        "versions": {"sdbatch": __import__("sdbatch").__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }


# ---------------------------------------------------------------- shards
def render_shards(ctx: Context, manifest: Manifest, num_shards: int) -> None:
    jobs_by_shard, skipped_by_shard = defaultdict(list), defaultdict(list)
    for job in manifest.jobs:
        jobs_by_shard[shard_of(job.id, num_shards)].append(job)
    for row in manifest.skipped:
        skipped_by_shard[shard_of(row.id, num_shards)].append(row)
    my_shards = shards_for(ctx.worker, num_shards)
    plans = [ShardRun(ctx, s, jobs_by_shard[s], skipped_by_shard[s]) for s in my_shards]
    total = sum(len(p.todo) for p in plans)
    bar = tqdm(total=total, unit="img", disable=not ctx.cfg.progress, position=ctx.worker.index % 8,
               desc=f"worker {ctx.worker.index}", dynamic_ncols=True)
    ctx.bar = bar
    for plan in plans:
        if ctx.stop.is_set():
            break
        plan.run()
    bar.close()


class ShardRun:
    """Brings one shard's images and ledger in line with the manifest."""

    def __init__(self, ctx: Context, shard: int, jobs: list[ImageJob], skipped: list):
        self.ctx, self.shard, self.jobs, self.skipped = ctx, shard, jobs, skipped
        self.ledger_file = ledger_path(ctx.output_dir, shard)
        self.rows_lock = threading.Lock()
        self.plan()

    def plan(self) -> None:
        """Split the shard's images into unchanged (kept), todo (render) and removed (left the manifest)."""
        ctx = self.ctx
        old = {(r["id"], r["image_index"]): r for r in read_ledger(self.ledger_file) if r["status"] != "skipped"}
        self.keys = {(j.id, j.image_index): content_key(j, ctx.cfg.scheduler.name, ctx.renderer.model.revision)
                     for j in self.jobs}
        self.rows, self.todo, self.changed, self.restated = {}, [], set(), 0
        for job in self.jobs:
            ident = (job.id, job.image_index)
            row = old.get(ident)
            if row and row["content_key"] == self.keys[ident] and row["status"] == "ok" and self.exists(row):
                self.rows[ident] = with_passthrough(row, job.extra)
                self.restated += self.rows[ident] is not row  # only passthrough columns changed: ledger only
            else:
                if row and row["content_key"] != self.keys[ident]:
                    self.changed.add(ident)
                self.todo.append(job)
        self.removed = [r for ident, r in old.items() if ident not in self.keys]
        self.orphans = self.find_orphans() if ctx.cfg.prune else []

    def find_orphans(self) -> list[Path]:
        """Images in the shard's folder that no current row names (rows removed on an earlier run without prune)."""
        current = {image_name(j.id, j.image_index) for j in self.jobs}
        return sorted(p for p in self.image_dir.glob("*.png") if p.name not in current) if self.image_dir.is_dir() else []

    def exists(self, row) -> bool:
        return bool(row.get("image_path")) and (self.ctx.output_dir / row["image_path"]).exists()

    def run(self) -> None:
        ctx = self.ctx
        ctx.counts["unchanged"] += len(self.rows)
        ctx.counts["removed"] += len(self.removed)
        if not (self.todo or self.removed or self.skipped or self.orphans or self.restated) and self.ledger_file.exists() and not (
                temp_files(self.image_dir) or temp_files(self.ledger_file.parent, self.ledger_file.name)):
            return  # complete: nothing to do
        lock = ShardLock(ctx.output_dir, self.shard, ctx.cfg.lock_stale_s)
        holder = lock.acquire()
        if holder:
            log.warning("shard %d is being rendered by another worker (%s); leaving it to that worker", self.shard, holder)
            ctx.counts["busy shards"] += 1
            return
        try:
            self.render(lock)
        finally:
            lock.release()

    def render(self, lock: ShardLock) -> None:
        ctx = self.ctx
        remove_temp_files(self.image_dir)
        remove_temp_files(self.ledger_file.parent, self.ledger_file.name)
        self.plan()  # again, under the lock: another worker may have finished images meanwhile
        self.adopt_finished_images()
        changed = sum((j.id, j.image_index) in self.changed for j in self.todo)
        ctx.counts["new"] += len(self.todo) - changed
        ctx.counts["changed"] += changed
        if ctx.cfg.prune:  # the removed rows' images, and any an earlier run without prune kept
            for path in self.orphans:
                path.unlink(missing_ok=True)
            ctx.counts["pruned"] += len(self.orphans)
        self.pending = []
        ctx.current = self
        last_flush = time.monotonic()
        for batch in batches(self.todo, ctx.cfg.batch_size):
            if ctx.stop.is_set():
                break
            if any(f.done() and f.exception() is not None for f in self.pending):
                break  # a write failed: stop rendering; flush() records what was written and reports it
            self.render_batch(batch)
            lock.refresh()
            if time.monotonic() - last_flush > LEDGER_FLUSH_S:
                self.flush(wait=False)
                last_flush = time.monotonic()
        self.flush(wait=True)
        ctx.current = None

    @property
    def image_dir(self) -> Path:
        return self.ctx.output_dir / "images" / f"{self.shard:05d}"

    def adopt_finished_images(self) -> None:
        """Images a killed run wrote but never recorded: keep them if they are what this row would render."""
        still_todo = []
        for job in self.todo:
            ident = (job.id, job.image_index)
            provenance = read_provenance(self.image_dir / image_name(job.id, job.image_index))
            row = (provenance or {}).get("ledger")
            if row and row.get("content_key") == self.keys[ident]:
                self.rows[ident] = {**row, "finished_at": datetime.fromisoformat(row["finished_at"])}
                self.ctx.counts["recovered"] += 1
            else:
                still_todo.append(job)
        self.todo = still_todo

    def render_batch(self, jobs: list[ImageJob]) -> None:
        ctx = self.ctx
        result = ctx.renderer.render(jobs)
        truncated = sum(result.truncated)
        if truncated:
            log.warning("%d prompt(s) were longer than the text encoder's window and were truncated "
                        "(flagged in the ledger's `truncated` column)", truncated)
        share = {stage: s / len(jobs) for stage, s in result.seconds.items()}
        for stage, s in result.seconds.items():
            ctx.seconds[stage] += s
        for job, pixels, failure, cut, batch_size in zip(jobs, result.pixels, result.failures, result.truncated,
                                                         result.batch_sizes):
            row = self.ledger_row(job, status="failed" if failure else "ok", reason=failure, truncated=cut,
                                  batch_size=batch_size, **share)
            if failure:
                row["image_path"] = None
                self.record(row, None)
                continue
            path = self.image_dir / image_name(job.id, job.image_index)
            parameters = a1111_parameters(job.prompt, job.negative_prompt, job.steps, ctx.cfg.scheduler.sampler,
                                          job.guidance_scale, job.seed, job.width, job.height, ctx.renderer.model.name)
            provenance = {**ctx.provenance, "manifest_row": manifest_row(job), "content_key": row["content_key"],
                          "ledger": {**row, "finished_at": row["finished_at"].isoformat()}}
            future = ctx.writer.submit(path, pixels, parameters, provenance)
            future.add_done_callback(lambda f, row=row: self.record(row, f))
            self.pending.append(future)

    def record(self, row: dict, future) -> None:
        """A written (or failed) image joins the shard's rows; called on writer threads."""
        if future is not None:
            if future.exception() is not None:
                return  # surfaced by flush()
            row["write_s"] = future.result()
            self.ctx.seconds["write_s"] += row["write_s"]
        with self.rows_lock:
            self.rows[(row["id"], row["image_index"])] = row
        self.ctx.counts["ok" if row["status"] == "ok" else "failed"] += 1
        self.ctx.bar.update(1)

    def ledger_row(self, job: ImageJob, **fields) -> dict:
        ctx = self.ctx
        row = {
            "id": job.id, "image_index": job.image_index, "seed": job.seed, "prompt": job.prompt,
            "negative_prompt": job.negative_prompt, "width": job.width, "height": job.height, "steps": job.steps,
            "guidance_scale": float(job.guidance_scale), "content_key": self.keys[(job.id, job.image_index)],
            "image_path": f"images/{self.shard:05d}/{image_name(job.id, job.image_index)}",
            "attention_backend": ctx.choice.label, "attention_detail": ctx.choice.detail,
            "model": ctx.renderer.model.name, "scheduler": ctx.cfg.scheduler.name, "shard": self.shard,
            "worker_index": ctx.worker.index, "num_workers": ctx.worker.count, "device": ctx.device_label,
            "finished_at": datetime.now(timezone.utc), "reason": None, "write_s": None,
        }
        row.update(fields)
        return {**row, **passthrough(job.extra)}

    def skipped_rows(self) -> list[dict]:
        ctx = self.ctx
        return [{"id": s.id, "image_index": 0, "prompt": s.prompt, "status": "skipped", "reason": s.reason,
                 "shard": self.shard, "worker_index": ctx.worker.index, "num_workers": ctx.worker.count,
                 "device": ctx.device_label, "model": ctx.renderer.model.name, "scheduler": ctx.cfg.scheduler.name,
                 "finished_at": datetime.now(timezone.utc), **passthrough(s.extra)} for s in self.skipped]

    def flush(self, wait: bool) -> None:
        """Write the shard's ledger: every image on disk now, the shard's skipped rows; removed rows leave it."""
        errors = [f.exception() for f in self.pending] if wait else []  # waits for every write in flight
        with self.rows_lock:
            rows = list(self.rows.values())
        write_ledger(self.ledger_file, rows + self.skipped_rows())  # first: what was written is recorded
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise SdbatchError(f"Writing an image under {self.image_dir} failed: {describe_os_error(error)}. The "
                               f"images already written are recorded in {self.ledger_file}; fix the disk and rerun."
                               ) from None


def describe_os_error(error: BaseException) -> str:
    """Plain words for the usual disk problems: '... is a file, not a folder', 'no space left', ..."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and getattr(error, "filename", None):
        return f"{error.strerror}: {error.filename} (a file is where a folder should be)"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    return str(error) or type(error).__name__


def batches(jobs: list[ImageJob], batch_size: int):
    """Static-shape batches: jobs grouped by (size, steps, guidance), then cut into batch_size pieces."""
    groups = defaultdict(list)
    for job in jobs:
        groups[batch_key(job)].append(job)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def manifest_row(job: ImageJob) -> dict:
    return {"id": job.id, "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
            "width": job.width, "height": job.height, "steps": job.steps, "guidance_scale": job.guidance_scale,
            "image_index": job.image_index, **job.extra}


def with_passthrough(row: dict, extra: dict) -> dict:
    """A kept ledger row with today's passthrough columns (a price edit re-renders nothing but shows in the ledger)."""
    old, new = {k: v for k, v in row.items() if k not in CORE_COLUMNS}, passthrough(extra)
    if old == new or json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
        return row  # (compared again as text because NaN != NaN)
    return {**{k: v for k, v in row.items() if k in CORE_COLUMNS}, **new}


def passthrough(extra: dict) -> dict:
    """Manifest columns carried into the ledger; one named like a ledger column gets a `manifest_` prefix."""
    return {(f"manifest_{k}" if k in CORE_COLUMNS else k): v for k, v in extra.items()}


def compact(numbers: list[int]) -> str:
    return str(numbers) if len(numbers) <= 8 else f"[{numbers[0]}, {numbers[1]}, ..., {numbers[-1]}] ({len(numbers)})"


# ---------------------------------------------------------------- stopping and the summary
class stop_on_signals:
    """SIGTERM/SIGUSR1: stop taking batches; if the batch in flight outlasts stop_timeout_s, record and exit."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.ctx.stop.is_set():
            return
        self.ctx.stop.set()
        log.warning("received %s: finishing the batch in flight (at most %ss), then recording and exiting",
                    signal.Signals(signum).name, self.ctx.cfg.stop_timeout_s)
        watchdog = threading.Timer(self.ctx.cfg.stop_timeout_s, self.give_up)
        watchdog.daemon = True
        watchdog.start()

    def give_up(self):
        log.warning("the batch in flight did not finish within %ss: exiting; its images will be rendered on rerun",
                    self.ctx.cfg.stop_timeout_s)
        shard = self.ctx.current
        try:
            if shard is not None:
                shard.flush(wait=False)  # record the images already written before leaving
        except Exception as error:  # exiting anyway: the rerun re-adopts unrecorded images from their metadata
            log.warning("could not write the ledger of shard %d before exiting: %s", shard.shard, error)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)


def print_summary(ctx: Context, wall_s: float) -> None:
    c = ctx.counts
    pruned = f" ({c['pruned']} images pruned)" if c["pruned"] else ""
    rendered = c["ok"] + c["failed"]
    stage_total = sum(ctx.seconds[s] for s in STAGES) or 1.0
    shares = ", ".join(f"{s.removesuffix('_s').replace('_', ' ')} {100 * ctx.seconds[s] / stage_total:.0f}%"
                       for s in STAGES)
    lines = [
        f"sdbatch worker {ctx.worker.index}/{ctx.worker.count}: {rendered} images rendered ({c['failed']} failed) "
        f"in {wall_s:.1f}s, {rendered / wall_s:.2f} images/s",
        f"  images: {c['new']} new, {c['changed']} changed, {c['unchanged']} unchanged, {c['removed']} removed"
        f"{pruned}, {c['recovered']} recovered from an earlier run",
        f"  stage time: {shares}",
    ]
    if c["busy shards"]:
        lines.append(f"  {c['busy shards']} shard(s) left to the worker already rendering them")
    if ctx.stop.is_set():
        lines.append(f"  interrupted: rerun the same command to continue (exit code {EXIT_INTERRUPTED})")
    print("\n".join(lines), file=sys.stdout, flush=True)
