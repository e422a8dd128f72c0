"""The output folder's records: per-shard Parquet ledgers, run-level settings, content keys and shard locks."""

import hashlib
import io
import json
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sdbatch import SdbatchError
from sdbatch.manifest import ImageJob
from sdbatch.plan import num_shards_for
from sdbatch.writer import write_atomic

SETTINGS_FILE = "sdbatch.json"
CORE_SCHEMA = pa.schema([
    ("id", pa.string()), ("image_index", pa.int64()), ("seed", pa.int64()),
    ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("width", pa.int64()), ("height", pa.int64()), ("steps", pa.int64()), ("guidance_scale", pa.float64()),
    ("content_key", pa.string()), ("image_path", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("truncated", pa.bool_()), ("attention_backend", pa.string()), ("attention_detail", pa.string()),
    ("model", pa.string()), ("scheduler", pa.string()),
    ("shard", pa.int64()), ("worker_index", pa.int64()), ("num_workers", pa.int64()), ("device", pa.string()),
    ("batch_size", pa.int64()), ("text_encode_s", pa.float64()), ("denoise_s", pa.float64()),
    ("vae_decode_s", pa.float64()), ("write_s", pa.float64()), ("finished_at", pa.timestamp("us", tz="UTC")),
])
CORE_COLUMNS = set(CORE_SCHEMA.names)


def content_key(job: ImageJob, scheduler: str, model: str) -> str:
    """Hash of everything that decides an image's pixels."""
    fields = [job.prompt, job.negative_prompt, job.seed, job.width, job.height, job.steps,
              float(job.guidance_scale), scheduler, model]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


# ---------------------------------------------------------------- ledgers
def ledger_path(output_dir: Path, shard: int) -> Path:
    return Path(output_dir) / "ledger" / f"shard-{shard:05d}.parquet"


def read_ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:
        raise SdbatchError(f"The ledger {path} cannot be read ({error}). Move it aside and rerun: "
                           f"its shard's images will be re-adopted from their metadata.") from None


def ledger_table(rows: list[dict]) -> pa.Table:
    """Core columns with fixed types; passthrough manifest columns keep the types Arrow infers."""
    core = pa.Table.from_pylist([{k: r.get(k) for k in CORE_SCHEMA.names} for r in rows], schema=CORE_SCHEMA)
    extra_names = list(dict.fromkeys(k for r in rows for k in r if k not in CORE_COLUMNS))
    for name in extra_names:
        values = [r.get(name) for r in rows]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across runs: keep them as text
            column = pa.array([None if v is None else str(v) for v in values], pa.string())
        core = core.append_column(name, column)
    return core


def write_ledger(path: Path, rows: list[dict]) -> None:
    buffer = io.BytesIO()
    pq.write_table(ledger_table(rows), buffer)
    write_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------- run-level settings
def open_folder(output_dir: Path, settings: dict, num_rows: int, shard_size: int, overwrite: bool,
                check_only: bool = False) -> int:
    """Fix or check the folder's run-level settings; returns its shard count (fixed at the first run)."""
    path = Path(output_dir) / SETTINGS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        changed = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
        if changed and not overwrite:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SdbatchError(
                f"{output_dir} was rendered with other run-level settings ({listed}). That change would re-render "
                f"every image that uses them. Pass overwrite=true to do that, or put the setting back "
                f"(or use a new output_dir).")
        num_shards = saved["num_shards"]
        if not changed or check_only:
            return num_shards
    else:
        num_shards = num_shards_for(num_rows, shard_size)
        if check_only:
            return num_shards
    state = {"num_shards": num_shards, "settings": settings}
    write_atomic(path, json.dumps(state, indent=1).encode())
    return num_shards


# ---------------------------------------------------------------- shard locks
class ShardLock:
    """Who renders a shard now: a lock file created exclusively, refreshed after each batch.

    A lock is stale when its process is gone (same host) or it has not been refreshed for `stale_s`.
    """

    def __init__(self, output_dir: Path, shard: int, stale_s: float):
        self.path = Path(output_dir) / "locks" / f"shard-{shard:05d}.lock"
        self.stale_s = stale_s
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def acquire(self) -> str | None:
        """Take the lock; returns None on success, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if not self._stale(holder):
                    return holder
                self._break(holder)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.token)
            return None
        return self._read()

    def refresh(self) -> None:
        os.utime(self.path)

    def release(self) -> None:
        if self._read() == self.token:
            self.path.unlink(missing_ok=True)

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return ""

    def _stale(self, holder: str) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        host, _, pid = holder.partition(":")
        pid = pid.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            return True
        return age > self.stale_s or holder == ""

    def _break(self, holder: str) -> None:
        # Rename first: of two workers breaking the same stale lock, only one rename finds it.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != holder:  # someone took it over in between: give it back
            os.rename(aside, self.path)
        else:
            aside.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
