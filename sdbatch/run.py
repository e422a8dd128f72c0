"""One worker process: check the setup, get today's plan, load the model, render until every shard it owns is
complete (helping with other workers' shards on the way), stop cleanly on signals, and summarise."""

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from concurrent.futures import Future, wait
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sdbatch import EXIT_INTERRUPTED, SdbatchError, attention, settings
from sdbatch.batcher import Batcher, ShardQueue
from sdbatch.cost import DEVICE_STAGES, cost_lines
from sdbatch.lease import Heartbeat, Holder, remove_tree
from sdbatch.ledger import ROW_INDEX, folder_shards, key_extras, open_folder, saved_settings
from sdbatch.lora import Adapters, fuse_run_loras
from sdbatch.manifest import Defaults, ImageJob, Manifest, lora_problems
from sdbatch.models import load_model, model_revision
from sdbatch.plan import num_shards_for, open_plan
from sdbatch.render import BatchResult, Renderer
from sdbatch.shard import Context, Shard
from sdbatch.weights import LoraFiles, lora_fingerprint, lora_problem
from sdbatch.workers import local_worker, resolve_worker
from sdbatch.writer import ImageFormat, ImageWriter, a1111_parameters, image_name

log = logging.getLogger("sdbatch")
EXIT_CTRL_C = 130  # the shell's code for SIGINT: stopped by the user, what was finished is recorded
STAGES = ("text_encode_s", "denoise_s", "vae_decode_s", "write_s")
MAX_OPEN_SHARDS = 64  # shards one worker holds at once, to fill batches from the few changed rows of each


def run(cfg) -> int:
    """Render this worker's share of the manifest (and help with the rest); returns the process exit code."""
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "prompts"):
        raise SdbatchError("No manifest given: pass prompts=PATH to a Parquet file with a 'prompt' column.")
    worker = local_worker(resolve_worker(cfg.worker_index, cfg.num_workers, os.environ),
                          int(os.environ.get("SDBATCH_LOCAL_RANK", 0)), int(os.environ.get("SDBATCH_LOCAL_COUNT", 1)))
    settings.check(cfg)
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    output_dir = Path(cfg.output_dir)
    fresh = not output_dir.exists()
    heartbeat = Heartbeat(cfg.lease_s)
    try:
        return _run(cfg, worker, device, dtype, output_dir, heartbeat, start)
    except SdbatchError:
        if fresh:
            discard_fresh_folder(output_dir)
        raise
    finally:
        heartbeat.stop()


def _run(cfg, worker, device, dtype, output_dir: Path, heartbeat: Heartbeat, start: float) -> int:
    check_output_dir(output_dir)
    run_loras = run_level_loras(cfg.lora)
    manifest = Manifest(cfg.prompts, settings.max_steps(cfg)[0], settings.min_image_size(cfg.model))
    for warning in manifest.misspelled():
        log.warning("%s: %s", cfg.prompts, warning)
    width, height = cfg.width or cfg.model.width, cfg.height or cfg.model.height
    if cfg.attention.name != "auto":  # fail before the (slow) model load when the backend cannot run at all
        problem = attention.why_not(cfg.attention.name, attention_options(cfg), device, dtype)
        if problem:
            raise SdbatchError(problem)
    dtype_name = str(dtype).removeprefix("torch.").replace("float16", "fp16").replace("bfloat16", "bf16").replace(
        "float32", "fp32")
    options = cfg.scheduler.get("options")
    image_format = ImageFormat.from_config(cfg)
    extras = key_extras(dtype_name, cfg.scheduler.name, OmegaConf.to_container(options) if options is not None else {},
                        asdict(image_format), [{"sha256": lora["sha256"], "scale": lora["scale"]} for lora in run_loras])
    run_level = {**model_identity(cfg.model, output_dir), "scheduler": cfg.scheduler.name, "steps": cfg.steps,
                 "width": width, "height": height, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
                 "negative_prompt": cfg.negative_prompt, "extras": extras}
    num_shards = folder_shards(output_dir) or num_shards_for(manifest.num_rows, cfg.shard_size)
    open_folder(output_dir, run_level, num_shards, cfg.overwrite, cfg.shard_size, check_only=True)
    holder = Holder.this_process(f"worker {worker.index} of {worker.count}")
    plan = open_plan(manifest, output_dir, num_shards, run_level, holder, cfg.lease_s, heartbeat)
    problems, lora_files = plan.problems, LoraFiles()
    bad_files = lora_problems(plan.loras, lora_files.problem)
    problems.kinds.update(bad_files.kinds)
    if problems.count and cfg.on_invalid == "error":
        raise SdbatchError(problems.message(cfg.prompts))
    defaults = Defaults(steps=cfg.steps, guidance_scale=cfg.guidance_scale, width=width, height=height,
                        seed=cfg.seed, negative_prompt=cfg.negative_prompt)
    ctx = Context(cfg, output_dir, worker, holder, heartbeat, plan, defaults, cfg.scheduler.name,
                  run_level["model"], extras, image_format.suffix, lora_state=lora_files.state,
                  bad_loras={path: f"lora file {lora_files.problem(path)}: {path}" for path in plan.loras
                             if lora_files.problem(path)})
    queue = ShardQueue(ctx, cfg.steal)
    if queue.nothing_to_do():  # a rerun with nothing left: no model to load
        job = Job(ctx, queue, None, None, {})
        print_summary(job, time.perf_counter() - start)
        return 0
    model = load_model(cfg.model).to(device, dtype)
    fuse_run_loras(model, run_loras)
    choice = attention.choose(cfg.attention, model, device, dtype, cfg.batch_size, width, height)
    attention.apply(model, choice)
    open_folder(output_dir, run_level, num_shards, cfg.overwrite, cfg.shard_size)
    adapters = None
    if plan.loras:  # per-row LoRAs: prepared before torch.compile sees the UNet
        adapters = Adapters(model, slot=cfg.compile and device.type == "cuda")
        adapters.prepare({path: lora_files.state(path) for path in plan.loras if lora_files.state(path)})
    speed_up(model, cfg, output_dir)
    ctx.ledger_fields = {"attention_backend": choice.label, "attention_detail": choice.detail, "model": model.name,
                         "scheduler": cfg.scheduler.name, "worker_index": worker.index, "num_workers": worker.count,
                         "device": device_label(device)}
    renderer = Renderer(model, cfg.scheduler, pad_to=cfg.batch_size if cfg.compile else None,
                        max_prompt_chunks=cfg.max_prompt_chunks, adapters=adapters)
    ctx.text_windows = renderer.windows
    job = Job(ctx, queue, renderer, ImageWriter(cfg.write_threads, image_format),
              provenance_base(cfg, model, choice, run_loras))
    log.info("worker %d of %d (%s) on %s, attention %s: %d of %d shards are its own%s", worker.index, worker.count,
             worker.source, ctx.ledger_fields["device"], choice.label, len(queue.own), plan.num_shards,
             "; then it helps with the others" if cfg.steal else "")
    with stop_on_signals(job):
        try:
            job.render_all()
        except BaseException:
            job.batcher.abandon()  # whatever went wrong, no lease stays held until it expires
            raise
    job.finish()
    print_summary(job, time.perf_counter() - start)
    return job.exit_code


class Job:
    """This worker's rendering: the shard queue, the batcher, the renderer, the writer and the stop flag."""

    def __init__(self, ctx: Context, queue: ShardQueue, renderer: Renderer | None, writer: ImageWriter | None,
                 provenance: dict):
        self.ctx, self.queue, self.renderer, self.writer, self.provenance = ctx, queue, renderer, writer, provenance
        self.batcher = Batcher(ctx, queue, ctx.cfg.batch_size, MAX_OPEN_SHARDS,
                               renderer.batch_key if renderer else None, on_open=self._opened)
        self.stop = threading.Event()
        self.stop_code = EXIT_INTERRUPTED
        self.futures: set[Future] = set()
        self.futures_guard = threading.Lock()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.batch_sizes: list[int] = []
        self.truncated = 0
        self.bar = tqdm(total=0, unit="img", disable=not ctx.cfg.progress, position=ctx.worker.index % 8,
                        desc=f"worker {ctx.worker.index}", dynamic_ncols=True)

    @property
    def exit_code(self) -> int:
        return self.stop_code if self.stop.is_set() else 0

    def render_all(self) -> None:
        poll_s = min(5.0, self.ctx.cfg.lease_s / 4)
        while not self.stop.is_set():
            batch = self.batcher.next_batch()
            if batch is not None:
                self.render(batch)
                self.batcher.commit_ready()
                continue
            self.drain()
            self.batcher.commit_ready(everything=True)
            if self.batcher.open:
                continue
            if not self.queue.own_left():
                return
            shard = self.queue.retry_busy()
            if shard is not None:
                self.batcher.add(shard)
            else:
                self.queue.wait(poll_s)

    def finish(self) -> None:
        """After the last batch (or a stop): wait for the writes, record every open shard, let them go."""
        self.drain()
        self.batcher.close()
        self.writer.close()
        self.bar.close()
        if self.truncated:
            log.warning("%d prompt(s) were longer than the text encoder's window and were truncated (flagged in "
                        "the ledger's `truncated` column)", self.truncated)

    def drain(self) -> None:
        with self.futures_guard:
            futures = list(self.futures)
        wait(futures)

    def _opened(self, shard: Shard) -> None:
        self.bar.total += len(shard.todo)
        self.bar.refresh()

    def render(self, jobs: list[ImageJob]) -> None:
        result = self._render(jobs)
        self.truncated += sum(result.truncated)
        share = {stage: s / len(jobs) for stage, s in result.seconds.items()}
        for stage, s in result.seconds.items():
            self.seconds[stage] += s
        self.batch_sizes.append(len(jobs))
        for job, pixels, failure, cut, batch_size in zip(jobs, result.pixels, result.failures, result.truncated,
                                                         result.batch_sizes):
            shard = self.batcher.open.get(job.shard)
            if shard is None or shard.lost:
                continue
            row = self._ledger_row(job, failure, cut, batch_size, share)
            if failure:
                row["image_path"] = None
                shard.record(row)
                self.bar.update(1)
                continue
            path = shard.image_dir / image_name(job.id, job.image_index, self.ctx.suffix)
            parameters = a1111_parameters(job.prompt, job.negative_prompt, job.steps, self.ctx.cfg.scheduler.sampler,
                                          job.guidance_scale, job.seed, job.width, job.height, self.renderer.model.name)
            provenance = {**self.provenance, "manifest_row": manifest_row(job), "content_key": job.content_key,
                          "lora": {**self.provenance["lora"], "row": row_lora(job)},
                          "ledger": {**{k: v for k, v in row.items() if k != ROW_INDEX},
                                     "finished_at": row["finished_at"].isoformat()}}
            future = self.writer.submit(path, pixels, parameters, provenance, shard.lease)
            with self.futures_guard:
                self.futures.add(future)
            future.add_done_callback(lambda f, row=row, shard=shard: self._written(f, row, shard))

    def _written(self, future: Future, row: dict, shard: Shard) -> None:
        if future.exception() is None:
            self.seconds["write_s"] += future.result()
        shard.record(row, future)
        self.bar.update(1)
        with self.futures_guard:
            self.futures.discard(future)

    def _render(self, jobs: list[ImageJob]) -> BatchResult:
        """The renderer's result; an error inside one batch fails that batch's images, not the run."""
        try:
            return self.renderer.render(jobs)
        except Exception as error:
            reason = f"rendering failed: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"
            log.warning("a batch of %d image(s) failed (%s); they are recorded as failed and retried on rerun",
                        len(jobs), reason)
            count = len(jobs)
            return BatchResult([None] * count, [reason] * count, [False] * count, {}, [count] * count)

    def _ledger_row(self, job: ImageJob, failure, truncated: bool, batch_size: int, share: dict) -> dict:
        return {
            **self.ctx.ledger_fields, "id": job.id, "image_index": job.image_index, "seed": job.seed,
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "width": job.width, "height": job.height,
            "steps": job.steps, "guidance_scale": float(job.guidance_scale), "lora": job.lora,
            "lora_scale": job.lora_scale, "content_key": job.content_key,
            "image_path": f"images/{job.shard:05d}/{image_name(job.id, job.image_index, self.ctx.suffix)}",
            "status": "failed" if failure else "ok", "reason": failure, "truncated": truncated, "shard": job.shard,
            "batch_size": batch_size, "finished_at": datetime.now(timezone.utc), "write_s": None,
            **{stage: share.get(stage) for stage in STAGES[:-1]}, ROW_INDEX: job.row,
        }

    def give_up(self) -> None:
        """The batch in flight outlasted stop_timeout_s: record what is written, let the shards go, exit now."""
        try:
            for shard in list(self.batcher.open.values()):
                if not shard.lost:
                    shard.commit(final=False)
                shard.release()
        except Exception as error:  # exiting anyway: the rerun re-adopts unrecorded images from their metadata
            log.warning("could not record every open shard before exiting: %s", error)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.stop_code)


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


def attention_options(cfg) -> dict:
    return {k: v for k, v in cfg.attention.items() if k != "name"}


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
    """Which physical GPU: its place in the machine's list (each worker process sees only its own GPU as cuda:0),
    its name and its PCI bus id."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    where = f", PCI {getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}" \
        if isinstance(bus, int) else ""
    return f"cuda:{physical} ({props.name}{where})"


def provenance_base(cfg, model, choice, run_loras: list) -> dict:
    import diffusers
    import transformers
    return {
        "model": {"name": model.name, "family": model.family, "weights": model.revision},
        "scheduler": OmegaConf.to_container(cfg.scheduler),
        "attention": {"backend": choice.label, "detail": choice.detail},
        "dtype": str(model.dtype).removeprefix("torch."),
        "lora": {"run": run_loras, "row": None},
        "versions": {"sdbatch": __import__("sdbatch").__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }


def manifest_row(job: ImageJob) -> dict:
    return {"id": job.id, "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
            "width": job.width, "height": job.height, "steps": job.steps, "guidance_scale": job.guidance_scale,
            "lora": job.lora, "lora_scale": job.lora_scale, "image_index": job.image_index, **job.extra}


def row_lora(job: ImageJob) -> dict | None:
    return None if job.lora is None else {"path": job.lora, "sha256": job.lora_sha256, "scale": job.lora_scale}


# ---------------------------------------------------------------- LoRA files
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


# ---------------------------------------------------------------- stopping and the summary
class stop_on_signals:
    """SIGTERM/SIGUSR1 (exit 75) or SIGINT (exit 130): stop taking batches and record what was written; if the
    batch in flight outlasts stop_timeout_s, or a second signal comes, record and exit at once."""

    CODES = {signal.SIGTERM: EXIT_INTERRUPTED, signal.SIGUSR1: EXIT_INTERRUPTED, signal.SIGINT: EXIT_CTRL_C}

    def __init__(self, job: Job):
        self.job = job

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.CODES}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        job = self.job
        if job.stop.is_set():
            threading.Thread(target=job.give_up, daemon=True).start()
            return
        job.stop_code = self.CODES[signal.Signals(signum)]
        job.stop.set()
        log.warning("received %s: finishing the batch in flight (at most %ss), then recording and exiting",
                    signal.Signals(signum).name, job.ctx.cfg.stop_timeout_s)
        watchdog = threading.Timer(job.ctx.cfg.stop_timeout_s, self.give_up)
        watchdog.daemon = True
        watchdog.start()

    def give_up(self):
        log.warning("the batch in flight did not finish within %ss: exiting; its images will be rendered on rerun",
                    self.job.ctx.cfg.stop_timeout_s)
        self.job.give_up()


def print_summary(job: Job, wall_s: float) -> None:
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
