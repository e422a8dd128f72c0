"""This worker's rendering: the model and its speed levers, the renderer, the writer, batches drawn from the shard
queue, stop signals; everything here needs torch, so sdbatch.run imports it only once there is work."""

import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, wait
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from sdbatch import EXIT_INTERRUPTED, SdbatchError, attention, fp8
from sdbatch.batcher import Batcher, ShardQueue
from sdbatch.ledger import ROW_INDEX, open_folder
from sdbatch.lora import Adapters, fuse_run_loras
from sdbatch.manifest import ImageJob
from sdbatch.models import load_model
from sdbatch.render import BatchResult, Renderer
from sdbatch.run import STAGES, Prepared, print_summary, run_cache
from sdbatch.shard import Context, Shard
from sdbatch.writer import ImageWriter, a1111_parameters, image_name

log = logging.getLogger("sdbatch")
EXIT_CTRL_C = 130  # the shell's code for SIGINT: stopped by the user, what was finished is recorded
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float16}
FP8_PROVENANCE = "fp8 (e4m3 UNet transformer matmuls but the one after GEGLU, float16 elsewhere)"
MAX_OPEN_SHARDS = 64  # shards one worker holds at once, to fill batches from the few changed rows of each


def render(prepared: Prepared) -> int:
    """Load the model, set it up for speed, render until the worker's own shards are complete, summarise."""
    quiet_libraries()
    ctx, cfg = prepared.ctx, prepared.ctx.cfg
    device, dtype = resolve_device(prepared.device, prepared.dtype)
    if cfg.attention.name != "auto":  # fail before the (slow) model load when the backend cannot run at all
        problem = attention.why_not(cfg.attention.name, attention_options(cfg), device, dtype)
        if problem:
            raise SdbatchError(problem)
    loading = time.perf_counter()
    model = load_model(cfg.model).to(device, dtype, DTYPES.get(cfg.vae_dtype))
    fuse_run_loras(model, prepared.run_loras)
    choosing = time.perf_counter()
    width, height = ctx.defaults.width, ctx.defaults.height
    choice = attention.choose(cfg.attention, model, device, dtype, cfg.batch_size, width, height,
                              timings_file=run_cache(cfg, ctx.output_dir) / attention.TIMINGS_FILE)
    attention.apply(model, choice)
    log.info("%.1fs after start: model loaded in %.1fs, attention chosen in %.1fs%s", time.perf_counter() -
             prepared.start, choosing - loading, time.perf_counter() - choosing,
             "; the first batch compiles (or loads the compile cache)" if cfg.compile and device.type == "cuda" else "")
    open_folder(ctx.output_dir, ctx.run_level, ctx.plan.num_shards, cfg.overwrite, cfg.shard_size)
    adapters = None
    if ctx.plan.loras:  # per-row LoRAs: a slot made before torch.compile or the fp8 swap sees the UNet
        adapters = Adapters(model, slot=(cfg.compile and device.type == "cuda") or cfg.dtype == "fp8")
        adapters.prepare({path: prepared.lora_files.state(path) for path in ctx.plan.loras
                          if prepared.lora_files.state(path)})
    speed_up(model, cfg, ctx.output_dir, choice.detail, lora_slot=adapters is not None and adapters.slot)
    ctx.ledger_fields = {"attention_backend": choice.label, "attention_detail": choice.detail, "model": model.name,
                         "scheduler": cfg.scheduler.name, "worker_index": ctx.worker.index,
                         "num_workers": ctx.worker.count, "device": device_label(device)}
    renderer = Renderer(model, cfg.scheduler, pad_to=cfg.batch_size if cfg.compile else None,
                        max_prompt_chunks=cfg.max_prompt_chunks, adapters=adapters)
    ctx.text_windows = renderer.windows
    job = Job(ctx, prepared.queue, renderer, ImageWriter(cfg.write_threads, prepared.image_format),
              provenance_base(cfg, model, choice, prepared.run_loras))
    log.info("worker %d of %d (%s) on %s, attention %s: %d of %d shards are its own%s", ctx.worker.index,
             ctx.worker.count, ctx.worker.source, ctx.ledger_fields["device"], choice.label, len(prepared.queue.own),
             ctx.plan.num_shards, "; then it helps with the others" if cfg.steal else "")
    with stop_on_signals(job):
        try:
            job.render_all()
        except BaseException:
            job.batcher.abandon()  # whatever went wrong, no lease stays held until it expires
            raise
    job.finish()
    print_summary(job, time.perf_counter() - prepared.start)
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


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' notes (dtype casts, deprecations) out of the user's log."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def attention_options(cfg) -> dict:
    return {k: v for k, v in cfg.attention.items() if k != "name"}


def speed_up(model, cfg, output_dir: Path, attention_detail: str, lora_slot: bool) -> None:
    """FP8 matmuls where asked for; GPU levers: fused projections, compiling with a compile cache kept in the output
    folder so array tasks and nightly reruns reuse it: `compile_engine=aot` saves the compiled model there for later
    processes to load, except with a per-row LoRA slot (peft's layers keep state in Python attributes, which a
    saved compile does not check). Not cuDNN autotuning: it bought no step time, and a new process spent 7 s of its
    first batch on it (SD1.5, batch 32, on an H100)."""
    gpu = model.device.type == "cuda"
    saved = None
    if gpu and cfg.compile:
        cache = run_cache(cfg, output_dir)
        point_compile_caches(cache)
        if cfg.compile_engine == "aot" and not lora_slot:
            saved = (cache / "aot", {"attention": attention_detail})
    model.optimise(fuse_qkv=cfg.fuse_qkv and gpu, fp8=cfg.dtype == "fp8", channels_last=cfg.channels_last and gpu,
                   compile_mode=cfg.compile_mode if cfg.compile and gpu else None, compile_scope=cfg.compile_scope,
                   saved_compile=saved)


_POINTED: set[str] = set()  # cache folders this process pointed torch at (a later run may point elsewhere)


def point_compile_caches(cache: Path) -> None:
    """Inductor's and Triton's caches in the run's cache folder, unless the user pointed them elsewhere. torch sets
    TORCHINDUCTOR_CACHE_DIR to its own default under /tmp as soon as torch._dynamo is imported (diffusers imports
    it), so that value is not the user's: keeping it would leave every host with its own cold cache."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    for name, folder in (("TORCHINDUCTOR_CACHE_DIR", cache / "inductor"), ("TRITON_CACHE_DIR", cache / "triton")):
        if os.environ.get(name) in (None, default_cache_dir(), *_POINTED):
            os.environ[name] = str(folder)
            _POINTED.add(str(folder))


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SdbatchError(f"device={device} was asked for, but torch sees no CUDA GPU here. Use device=cpu or device=auto.")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise SdbatchError(f"dtype={dtype} is not one of auto, {', '.join(DTYPES)}.")
    problem = fp8.why_not(torch.device(device)) if dtype == "fp8" else None
    if problem:
        raise SdbatchError(problem)
    return torch.device(device), DTYPES[dtype]


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
        "dtype": FP8_PROVENANCE if cfg.dtype == "fp8" else str(model.dtype).removeprefix("torch."),
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
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


