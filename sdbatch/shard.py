"""One leased shard: what the plan wants against what its ledger and image folder hold, what is left to render,
and its ledger commits (through the shard's lease, so only the newest holder's ledger can land)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sdbatch.lease import Heartbeat, Holder, Lease, LeaseLost
from sdbatch.ledger import (CORE_COLUMNS, CORE_SCHEMA, ROW_INDEX, as_core, content_key, core_rows, ledger_path, ledger_table, parquet_bytes,
                            read_ledger)
from sdbatch.manifest import Defaults, ImageJob, derive_seed
from sdbatch.plan import Plan
from sdbatch.workers import Worker
from sdbatch.writer import image_name, read_provenance, remove_temp_files, stage_file

log = logging.getLogger("sdbatch")
OUR_IMAGE = re.compile(r".+-[0-9a-f]{12}_\d+\.(png|webp|jpg)")  # what image_name() makes


@dataclass
class Context:
    """What every shard this worker takes shares."""
    cfg: object
    output_dir: Path
    worker: Worker
    holder: Holder
    heartbeat: Heartbeat
    plan: Plan
    defaults: Defaults
    scheduler: str
    model: str  # the model identity in content keys
    key_extras: dict  # settings beyond the first sdbatch's, in content keys
    suffix: str  # the image files' extension
    ledger_fields: dict = field(default_factory=dict)  # attention, device, ... (same for every image)
    text_windows: object = lambda prompt, negative_prompt, guidance_scale: 1  # the renderer's, once there is one
    lora_state: object = lambda path: None  # a LoRA file's fingerprint, or None when it cannot be used (cached)
    bad_loras: dict = field(default_factory=dict)  # LoRA path -> why its rows are skipped (on_invalid=skip)
    run_level: dict = field(default_factory=dict)  # the folder's run-level settings for this run
    counts: Counter = field(default_factory=Counter)
    skipped_names: list = field(default_factory=list)  # the first few skipped rows, for the summary
    commit_lock: threading.Lock = field(default_factory=threading.Lock)

    def lease(self, shard: int) -> Lease:
        return Lease(self.output_dir / "leases" / f"shard-{shard:05d}", self.holder, self.cfg.lease_s)


class Shard:
    """A shard this worker holds: examined on opening, rendered by the batcher, committed when written."""

    def __init__(self, ctx: Context, number: int, lease: Lease):
        self.ctx, self.number, self.lease = ctx, number, lease
        self.guard = threading.Lock()
        self.finished: list[dict] = []  # ledger rows of images finished in this run (written, failed, adopted)
        self.in_flight = 0  # images handed to the renderer or writer and not yet finished
        self.write_error: BaseException | None = None
        self.categories: dict[tuple, str] = {}  # (id, image_index) -> new | changed | retried | missing
        self.examine()

    @property
    def image_dir(self) -> Path:
        return self.ctx.output_dir / "images" / f"{self.number:05d}"

    @property
    def ledger_file(self) -> Path:
        return ledger_path(self.ctx.output_dir, self.number)

    @property
    def lost(self) -> bool:
        return self.lease.lost

    # ------------------------------------------------------------ what is there, what is wanted
    def examine(self) -> None:
        ctx = self.ctx
        remove_temp_files(self.image_dir)  # an earlier sdbatch staged files beside the images
        remove_temp_files(self.ledger_file.parent, self.ledger_file.name)
        self.rows = mark_bad_loras(ctx.plan.rows(self.number), ctx.bad_loras)
        images = expand(self.rows, ctx.defaults)
        images = images.append_column("lora_sha256", pa.array(
            [None if p is None else ctx.lora_state(p) for p in images.column("lora").to_pylist()], pa.string()))
        keys = [content_key(*fields[:7], ctx.scheduler, ctx.model, self._extras(*fields)) for fields in zip(*(
            images.column(c).to_pylist() for c in ("prompt", "negative_prompt", "seed", "width", "height", "steps",
                                                    "guidance_scale", "lora_sha256", "lora_scale")))]
        names = [image_name(i, k, ctx.suffix) for i, k in zip(images.column("id").to_pylist(),
                                                 images.column("image_index").to_pylist())]
        images = images.append_column("content_key", pa.array(keys, pa.string()))
        images = images.append_column("name", pa.array(names, pa.string()))
        self.old = read_ledger(self.ledger_file)
        on_disk = self._files_on_disk()
        self.kept, todo = self._compare(images, on_disk)
        self.todo = self._adopt(todo, on_disk)
        self.skipped = self._skipped_rows()
        self.orphans = self._orphans(set(names), on_disk) if ctx.cfg.prune else []

    def _extras(self, prompt, negative_prompt, seed, width, height, steps, guidance_scale, lora_sha256,
                lora_scale) -> dict:
        """The run's key extras, plus the text windows of a prompt longer than one (one was all the first sdbatch
        encoded) and the row's LoRA (content fingerprint and scale); a row without either keeps the run's."""
        extras = self.ctx.key_extras
        windows = self.ctx.text_windows(prompt, negative_prompt, guidance_scale)
        if windows > 1:
            extras = {**extras, "text_windows": windows}
        if lora_sha256 is not None:
            extras = {**extras, "row_lora": {"sha256": lora_sha256, "scale": lora_scale}}
        return extras

    def _files_on_disk(self) -> set[str]:
        try:
            return {e.name for e in os.scandir(self.image_dir) if e.is_file(follow_symlinks=False)}
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def _compare(self, images: pa.Table, on_disk: set[str]) -> tuple[pa.Table, pa.Table]:
        """A columnar join of today's images with the ledger: kept (unchanged, on disk) and todo."""
        images = images.append_column("i", pa.array(np.arange(images.num_rows)))
        old = self.old
        if old is None or old.num_rows == 0:
            self.removed = 0
            return as_core(_empty_ledger(), pa.array([], pa.int64())), images.append_column(
                "category", pa.array(["new"] * images.num_rows, pa.string()))
        old_keys = pa.table({"id": old.column("id"), "image_index": old.column("image_index"),
                             "old_key": old.column("content_key"), "old_status": old.column("status"),
                             "old_i": pa.array(np.arange(old.num_rows))})
        joined = images.join(old_keys, ["id", "image_index"], join_type="left outer").sort_by("i")
        same = pc.fill_null(pc.equal(joined.column("old_key"), joined.column("content_key")), False)
        ok = pc.fill_null(pc.equal(joined.column("old_status"), "ok"), False)
        there = pc.is_in(joined.column("name"), value_set=pa.array(sorted(on_disk), pa.string()))
        keep = pc.and_(pc.and_(same, ok), there)
        kept = joined.filter(keep)
        kept_core = as_core(old.take(kept.column("old_i")), kept.column(ROW_INDEX))
        todo = joined.filter(pc.invert(keep))
        category = pc.if_else(pc.is_null(todo.column("old_key")), "new", pc.if_else(
            pc.fill_null(pc.equal(todo.column("old_key"), todo.column("content_key")), False),
            pc.if_else(pc.fill_null(pc.equal(todo.column("old_status"), "failed"), False), "retried", "missing"),
            "changed"))
        matched = set(joined.column("old_i").drop_null().to_pylist())
        statuses = old.column("status").to_pylist()
        self.removed = sum(1 for i, s in enumerate(statuses) if i not in matched and s != "skipped")
        return kept_core, todo.append_column("category", category)

    def _adopt(self, todo: pa.Table, on_disk: set[str]) -> list[ImageJob]:
        """Images a killed run wrote but never recorded are kept if they are what their row would render now."""
        jobs = []
        for image in todo.to_pylist():
            if image["name"] in on_disk:
                recorded = (read_provenance(self.image_dir / image["name"]) or {}).get("ledger")
                if recorded and recorded.get("content_key") == image["content_key"]:
                    self.finished.append(adopted_row(recorded, image[ROW_INDEX]))
                    self.ctx.counts["recovered"] += 1
                    continue
            self.categories[(image["id"], image["image_index"])] = image["category"]
            jobs.append(self._job(image))
        return jobs

    def _job(self, image: dict) -> ImageJob:
        extra = {name: image_row_value(self.rows, name, image[ROW_INDEX]) for name in self.ctx.plan.passthrough}
        return ImageJob(image["id"], image["image_index"], image["prompt"], image["negative_prompt"], image["seed"],
                        image["width"], image["height"], image["steps"], image["guidance_scale"], extra,
                        self.number, image["content_key"], image[ROW_INDEX], image["lora"], image["lora_scale"],
                        image["lora_sha256"])

    def _skipped_rows(self) -> list[dict]:
        bad = self.rows.filter(pc.is_valid(self.rows.column("reason")))
        index = np.flatnonzero(self.rows.column("reason").is_valid().to_numpy(zero_copy_only=False))
        rows = []
        for i, row in zip(index.tolist(), bad.select(["row", "id", "prompt", "reason"]).to_pylist()):
            reason = row["reason"] if row["id"] is not None else f"{row['reason']} (manifest row {row['row']})"
            rows.append({**self.ctx.ledger_fields, "id": row["id"], "image_index": 0, "prompt": row["prompt"],
                         "status": "skipped", "reason": reason, "shard": self.number, ROW_INDEX: i})
        return rows

    def _orphans(self, current: set[str], on_disk: set[str]) -> list[Path]:
        """Images of rows that left the manifest: only files sdbatch wrote (by name and embedded provenance),
        never through a symlinked folder, and never those of rows skipped today (they are still in it)."""
        if self.image_dir.is_symlink():
            log.warning("not pruning %s: it is a symbolic link, and sdbatch deletes only inside output_dir",
                        self.image_dir)
            return []
        skipped_ids = [row["id"] for row in self.skipped if row["id"] is not None]
        kept_stems = {image_name(i, 0).rsplit("_", 1)[0] for i in skipped_ids}
        orphans = []
        for name in sorted(on_disk - current):
            if OUR_IMAGE.fullmatch(name) and name.rsplit("_", 1)[0] not in kept_stems:
                if read_provenance(self.image_dir / name) is not None:
                    orphans.append(self.image_dir / name)
        return orphans

    # ------------------------------------------------------------ results
    def record(self, row: dict, future=None) -> None:
        """A written (or failed) image joins the shard's rows; called on writer threads."""
        if future is not None:
            error = future.exception()
            if error is not None:
                self._write_failed(error)
                return
            row["write_s"] = future.result()
        with self.guard:
            self.finished.append(row)
            self.in_flight -= 1
        category = self.categories.get((row["id"], row["image_index"]), "new")
        self.ctx.counts[category] += 1
        self.ctx.counts["ok" if row["status"] == "ok" else "failed"] += 1

    def _write_failed(self, error: BaseException) -> None:
        with self.guard:
            self.in_flight -= 1
            if isinstance(error, LeaseLost) or not self.lease.staging_exists():
                self.lease.lost = True
            elif self.write_error is None:
                self.write_error = error

    @property
    def written(self) -> bool:
        with self.guard:
            return self.in_flight == 0

    # ------------------------------------------------------------ committing
    def commit(self, final: bool) -> None:
        """Write the shard's ledger: kept rows, this run's rows and skipped rows; rows that left the manifest go.
        A final commit also prunes and marks the shard complete for today's plan."""
        with self.ctx.commit_lock:
            if final:
                self._prune()
            with self.guard:
                finished = list(self.finished)
            core = pa.concat_tables([self.kept, core_rows(finished + self.skipped)])
            core = core.sort_by([(ROW_INDEX, "ascending"), ("image_index", "ascending")])
            table = ledger_table(core, self.rows, self.ctx.plan.passthrough)
            if not (final and self.old is not None and _same(table, self.old)):
                self.ledger_file.parent.mkdir(parents=True, exist_ok=True)
                temp = stage_file(self.lease.staging, self.ledger_file.name, parquet_bytes(table))
                self.lease.commit(temp, self.ledger_file)
            if final:
                self._mark_done(table)

    def _prune(self) -> None:
        for path in self.orphans:
            path.unlink(missing_ok=True)
        self.ctx.counts["pruned"] += len(self.orphans)

    def _mark_done(self, table: pa.Table) -> None:
        statuses = Counter(table.column("status").to_pylist())
        stat = os.stat(self.ledger_file)
        self.ctx.plan.mark_done(self.number, {
            "ledger": [stat.st_size, stat.st_mtime_ns], "ok": statuses["ok"], "failed": statuses["failed"],
            "skipped": statuses["skipped"], "pruned": bool(self.ctx.cfg.prune), "worker": self.ctx.worker.index,
            "at": datetime.now(timezone.utc).isoformat(), "loras": self.lora_states()})

    def lora_states(self) -> dict:
        """{LoRA path: fingerprint or None} for every LoRA file the shard's rows name: a shard is complete only
        while they stay as they were (a retrained LoRA at the same path re-renders its rows)."""
        paths = pc.unique(self.rows.column("lora").drop_null()).to_pylist()
        return {path: self.ctx.lora_state(path) for path in sorted(paths)}

    def release(self) -> None:
        self.ctx.heartbeat.remove(self.lease)
        self.lease.release()


def complete(ctx: Context, shard: int, mark: dict | None, examined_here: bool) -> bool:
    """Is the shard complete for today's plan? Its mark must match its ledger as it is now (a ledger rewritten since
    belongs to another plan), no image may have been deleted since (the folder changed after the ledger), prune
    runs need a pruned mark, and failed images are retried by a new process."""
    if not mark:
        return False
    ledger = ledger_path(ctx.output_dir, shard)
    try:
        stat = os.stat(ledger)
    except FileNotFoundError:
        return False
    if [stat.st_size, stat.st_mtime_ns] != mark["ledger"]:
        return False
    try:
        if os.stat(ctx.output_dir / "images" / f"{shard:05d}").st_mtime_ns > stat.st_mtime_ns:
            return False
    except FileNotFoundError:
        pass
    if ctx.cfg.prune and not mark.get("pruned"):
        return False
    if any(ctx.lora_state(path) != state for path, state in mark.get("loras", {}).items()):
        return False
    return not mark.get("failed") or examined_here


def expand(rows: pa.Table, defaults: Defaults) -> pa.Table:
    """The valid rows as one row per image: defaults filled in, seeds resolved, `_row` naming the plan row."""
    valid_index = np.flatnonzero(rows.column("reason").is_null().to_numpy(zero_copy_only=False))
    valid = rows.take(valid_index)
    counts = pc.fill_null(valid.column("num_images"), 1).to_numpy(zero_copy_only=False).astype(np.int64)
    take = np.repeat(np.arange(valid.num_rows), counts)
    image_index = np.arange(len(take)) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = valid.column("id").to_pylist()
    seeds = [derive_seed(defaults.seed, i) if s is None else s for i, s in zip(ids, valid.column("seed").to_pylist())]
    filled = {
        "prompt": valid.column("prompt"),
        "negative_prompt": pc.fill_null(valid.column("negative_prompt"), defaults.negative_prompt),
        "width": pc.fill_null(valid.column("width"), defaults.width),
        "height": pc.fill_null(valid.column("height"), defaults.height),
        "steps": pc.fill_null(valid.column("steps"), defaults.steps),
        "guidance_scale": pc.fill_null(valid.column("guidance_scale"), float(defaults.guidance_scale)),
        "lora": valid.column("lora"),
        "lora_scale": pc.if_else(pc.is_valid(valid.column("lora")), pc.fill_null(valid.column("lora_scale"), 1.0),
                                 pa.scalar(None, pa.float64())),
    }
    index = pa.array(take)
    columns = {"id": valid.column("id").take(index), "image_index": pa.array(image_index, pa.int64()),
               "seed": pa.array(np.array(seeds, dtype=np.int64)[take] + image_index, pa.int64())}
    columns |= {name: column.take(index) for name, column in filled.items()}
    columns[ROW_INDEX] = pa.array(valid_index[take], pa.int64())
    return pa.table(columns)


def mark_bad_loras(rows: pa.Table, bad: dict) -> pa.Table:
    """Rows naming a LoRA file that cannot be used are invalid (skipped), with the file's problem as their reason."""
    if not bad or rows.num_rows == 0:
        return rows
    paths, reasons = rows.column("lora").to_pylist(), rows.column("reason").to_pylist()
    marked = [old if path not in bad else (f"{old}; {bad[path]}" if old else bad[path])
              for path, old in zip(paths, reasons)]
    return rows.set_column(rows.schema.get_field_index("reason"), "reason", pa.array(marked, pa.string()))


def image_row_value(rows: pa.Table, name: str, index: int):
    return rows.column(name)[index].as_py()


def adopted_row(recorded: dict, row_index: int) -> dict:
    """A ledger row read back from an image's provenance: core columns only (today's passthrough is added)."""
    row = {k: recorded.get(k) for k in CORE_COLUMNS}
    if isinstance(row["finished_at"], str):
        row["finished_at"] = datetime.fromisoformat(row["finished_at"])
    row[ROW_INDEX] = row_index
    return row


def _empty_ledger() -> pa.Table:
    return CORE_SCHEMA.empty_table()


def _same(table: pa.Table, old: pa.Table) -> bool:
    """The ledger on disk already says exactly this (so a complete shard's files are left untouched)."""
    try:
        return table.schema.names == old.schema.names and table.cast(old.schema).equals(old)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False
