"""The plan of one manifest: every row's shard, computed once by one worker and shared through the output folder.

`plans/<plan id>/` holds the manifest's rows, normalised and sorted by shard into part files (so a worker reads
only its shards' row groups), `plan.json` (written last: the plan exists once it does) and `done/`, where each
shard's completion for this plan is marked after its ledger is committed. The plan id covers the manifest's files
(paths, sizes, mtimes, Parquet footers), the folder's shard count and its run-level settings, so an unchanged
nightly rerun reuses yesterday's plan and reads nothing else of the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from sdbatch import SdbatchError
from sdbatch.lease import Heartbeat, Holder, Lease, remove_tree
from sdbatch.manifest import Manifest, Problems, count_loras, labels, record_problems

log = logging.getLogger("sdbatch")
PLAN_FORMAT = 2  # 2: rows carry lora and lora_scale; plan.json lists the LoRA files
ROW_GROUP_ROWS = 4096  # small row groups: reading one shard touches little of each part
PLAN_FILE = "plan.json"
OLD_PLAN_S = 7 * 24 * 3600  # plans made this long ago are deleted by the next planner (a rerun of one remakes it)


def shard_of(row_id: str, num_shards: int) -> int:
    """Stable across runs, machines and Python versions (unlike hash())."""
    digest = hashlib.sha256(row_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def id_digests(ids: pa.Array) -> np.ndarray:
    """The first 8 bytes of each id's SHA-256 as uint64 (0 for a null id): shard_of() for a whole column, with the
    loop over ids left to C (map) rather than Python bytecode, since a 10M-row manifest has 10M ids to hash."""
    texts = pc.fill_null(ids, "").cast(pa.binary()).to_pylist()
    digests = b"".join(map(methodcaller("digest"), map(hashlib.sha256, texts)))
    first8 = np.frombuffer(digests, dtype=">u8").reshape(-1, 4)[:, 0].astype(np.uint64)
    return np.where(ids.is_null().to_numpy(zero_copy_only=False), np.uint64(0), first8)


def shards_of(rows: pa.Table, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shard (by id; a row without a usable id, which will be skipped, by its row number) and its id
    digest."""
    digests = id_digests(rows.column("id").combine_chunks())
    null = rows.column("id").is_null().to_numpy(zero_copy_only=False)
    by_row = rows.column("row").to_numpy().astype(np.uint64)
    return np.where(null, by_row, digests) % np.uint64(num_shards), digests


def num_shards_for(num_rows: int, shard_size: int) -> int:
    if shard_size < 1:
        raise SdbatchError(f"shard_size must be a whole number of at least 1, not {shard_size}.")
    return max(1, -(-num_rows // shard_size))


def plan_id(fingerprint: str, num_shards: int, settings: dict) -> str:
    text = json.dumps([PLAN_FORMAT, fingerprint, num_shards, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Plan:
    folder: Path
    meta: dict

    @property
    def num_shards(self) -> int:
        return self.meta["num_shards"]

    @property
    def problems(self) -> Problems:
        return Problems.from_json(self.meta["problems"])

    def images_in(self, shard: int) -> int:
        """Images the shard's valid rows ask for (duplicated ids included: an upper bound)."""
        return self.meta["images_per_shard"][shard]

    @property
    def passthrough(self) -> list[str]:
        return self.meta["passthrough"]

    @property
    def loras(self) -> dict:
        """{LoRA path: [valid rows using it, their first few names]} over the whole manifest."""
        return self.meta.get("loras", {})

    def rows(self, shard: int) -> pa.Table:
        """The shard's rows in manifest order, with `reason` set on rows that are invalid."""
        if not hasattr(self, "_dataset"):
            self._dataset = ds.dataset(sorted(self.folder.glob("part-*.parquet")), format="parquet")
        rows = self._dataset.to_table(filter=ds.field("shard") == shard).sort_by("row")
        return mark_duplicates(rows)

    # ------------------------------------------------------------ completion marks
    def done_path(self, shard: int) -> Path:
        return self.folder / "done" / f"shard-{shard:05d}.json"

    def mark_done(self, shard: int, record: dict) -> None:
        path = self.done_path(shard)
        path.parent.mkdir(exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(record))
        os.replace(temp, path)

    def mark(self, shard: int) -> dict | None:
        try:
            return json.loads(self.done_path(shard).read_text())
        except (OSError, ValueError):
            return None

    def done_marks(self) -> dict[int, dict]:
        """Every shard marked complete for this plan (one folder listing), with what its mark recorded."""
        marks = {}
        try:
            names = os.listdir(self.folder / "done")
        except FileNotFoundError:
            return marks
        for name in names:
            if name.startswith("shard-") and name.endswith(".json"):
                try:
                    marks[int(name[6:-5])] = json.loads((self.folder / "done" / name).read_text())
                except (OSError, ValueError):
                    pass  # replaced or half-written a moment ago: treat as not done
        return marks


def mark_duplicates(rows: pa.Table) -> pa.Table:
    """Rows whose id another row also has are invalid (one id always lands in one shard, so this is exact)."""
    ids = rows.column("id")
    counts = pc.value_counts(ids.drop_null())
    duplicated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(duplicated) == 0:
        return rows
    dup = pc.fill_null(pc.is_in(ids, value_set=duplicated), False)
    reason = rows.column("reason")
    marked = pc.if_else(dup, pc.if_else(pc.is_valid(reason), pc.binary_join_element_wise(
        reason, pa.scalar("duplicate id"), "; "), pa.scalar("duplicate id")), reason)
    return rows.set_column(rows.schema.get_field_index("reason"), "reason", marked)


# ---------------------------------------------------------------- making the plan
def build(manifest: Manifest, num_shards: int, folder: Path) -> dict:
    """Write the plan's part files into `folder` and return its metadata (written last, by the caller)."""
    folder.mkdir(parents=True, exist_ok=True)
    problems = Problems()
    images = np.zeros(num_shards, dtype=np.int64)
    skipped = np.zeros(num_shards, dtype=np.int64)
    digests, loras, started = [], {}, time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as writer:  # writes chunk n (no GIL) while chunk n+1's ids are hashed
        written = None
        for part, (_, rows) in enumerate(manifest.chunks()):
            shard, digest = shards_of(rows, num_shards)
            record_problems(rows, problems)
            count_loras(rows, loras)
            valid = rows.column("reason").is_null().to_numpy(zero_copy_only=False)
            counts = pc.fill_null(rows.column("num_images"), 1).to_numpy(zero_copy_only=False)
            images += np.bincount(shard[valid].astype(np.int64), weights=counts[valid],
                                  minlength=num_shards).astype(np.int64)
            skipped += np.bincount(shard[~valid].astype(np.int64), minlength=num_shards)
            digests.append(digest[valid])
            if written is not None:
                written.result()  # one chunk in writing at a time: memory stays bounded
            written = writer.submit(write_part, rows, shard, folder / f"part-{part:05d}.parquet")
        if written is not None:
            written.result()
    plan = Plan(folder, {"num_shards": num_shards})
    digests = np.concatenate(digests) if digests else np.zeros(0, np.uint64)
    _add_duplicates(plan, digests, num_shards, problems)
    pa.default_memory_pool().release_unused()  # the chunks are gone: give their memory back before the model loads
    log.info("planned %d rows of %s into %d shards in %.1fs", manifest.num_rows, manifest.path, num_shards,
             time.monotonic() - started)
    return {"format": PLAN_FORMAT, "manifest": manifest.path, "num_rows": manifest.num_rows,
            "num_shards": num_shards, "passthrough": list(manifest.passthrough.values()),
            "images_per_shard": images.tolist(), "skipped_per_shard": skipped.tolist(),
            "problems": problems.to_json(), "loras": loras}


def write_part(rows: pa.Table, shard: np.ndarray, path: Path) -> None:
    """One chunk's rows sorted by shard, in small row groups; no dictionary encoding (ids and prompts are unique
    text, so building dictionaries for them only costs time)."""
    order = np.argsort(shard, kind="stable")
    table = rows.append_column("shard", pa.array(shard.astype(np.int64))).take(order)
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, use_dictionary=False)


def _add_duplicates(plan: Plan, digests: np.ndarray, num_shards: int, problems: Problems) -> None:
    """Count and name duplicated ids across the whole manifest (found by digest, confirmed per shard)."""
    digests.sort()  # in place: 80 MB for 10M rows, no second copy
    suspects = np.unique(digests[1:][digests[1:] == digests[:-1]])
    if len(suspects) == 0:
        return
    shards = sorted({int(d % np.uint64(num_shards)) for d in suspects})
    dup_ids, dup_rows = [], 0
    for shard in shards:
        rows = plan.rows(shard)
        dup = rows.filter(pc.fill_null(pc.match_substring(rows.column("reason"), "duplicate id"), False))
        dup_rows += dup.num_rows
        dup_ids += list(dict.fromkeys(labels(dup)))
    problems.add("duplicate id", "id", "an id that another row also has", dup_ids, "duplicated ids")
    problems.kinds["duplicate id"].rows = dup_rows


def open_plan(manifest: Manifest, output_dir: Path, num_shards: int, settings: dict, holder: Holder,
              lease_s: float, heartbeat: Heartbeat, on_new_plan=lambda: None) -> Plan:
    """Today's plan: read it if it exists, else make it (one worker plans; the others wait for it, and take over
    if the planner's lease expires). `on_new_plan` runs once when the plan does not exist yet, as this worker starts
    making it or waiting for another's."""
    pid = plan_id(manifest.fingerprint(), num_shards, settings)
    folder = output_dir / "plans" / pid
    lease = Lease(output_dir / "leases" / f"plan-{pid}", holder, lease_s)
    waited = None
    if not (folder / PLAN_FILE).exists():
        on_new_plan()
    while not (folder / PLAN_FILE).exists():
        busy = lease.acquire()
        if busy is None:
            heartbeat.add(lease)
            try:
                _make(manifest, folder, num_shards, lease)
            finally:
                heartbeat.remove(lease)
                lease.release()
            break
        if waited != busy.generation:
            log.info("waiting for the plan of %s, which %s is making", manifest.path, busy.describe())
            waited = busy.generation
        time.sleep(min(2.0, lease_s / 4))
    return load(folder)


def _make(manifest: Manifest, folder: Path, num_shards: int, lease: Lease) -> None:
    if (folder / PLAN_FILE).exists():
        return  # made by another worker between our look and our lease
    staging = lease.staging / "plan"
    meta = build(manifest, num_shards, staging)
    (staging / PLAN_FILE).write_text(json.dumps(meta))
    folder.parent.mkdir(parents=True, exist_ok=True)
    lease.commit(staging, folder)
    _forget_old_plans(folder.parent, keep=folder.name)


def load(folder: Path) -> Plan:
    return Plan(folder, json.loads((folder / PLAN_FILE).read_text()))


def _forget_old_plans(plans: Path, keep: str) -> None:
    for entry in os.scandir(plans):
        if entry.name == keep or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            age = time.time() - os.stat(Path(entry.path) / PLAN_FILE).st_mtime
        except FileNotFoundError:
            continue
        if age > OLD_PLAN_S:
            remove_tree(Path(entry.path))
