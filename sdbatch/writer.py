"""PNG files with generation metadata, written atomically on a thread pool that overlaps the GPU."""

import hashlib
import io
import json
import os
import re
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

PROVENANCE_KEY = "sdbatch"  # the PNG text chunk holding the JSON provenance (and the ledger row)
TEMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)  # read once at import (os.umask sets it too, so it is not safe on writer threads)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's 0600 would hide outputs from the rest of a team


def image_name(row_id: str, image_index: int) -> str:
    """A safe, stable, collision-free file name for an id: readable slug + hash of the exact id."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", row_id).strip("._")[:60] or "id"
    digest = hashlib.sha256(row_id.encode("utf-8")).hexdigest()[:12]
    return f"{slug}-{digest}_{image_index}.png"


def a1111_parameters(prompt: str, negative_prompt: str, steps: int, sampler: str, guidance_scale: float,
                     seed: int, width: int, height: int, model: str) -> str:
    """The `parameters` text every SD tool reads (AUTOMATIC1111's format)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance_scale:g}, Seed: {seed}, "
                 f"Size: {width}x{height}, Model: {model}")
    return "\n".join(lines)


def encode_png(pixels: np.ndarray, parameters: str, provenance: dict) -> bytes:
    info = PngInfo()
    info.add_itxt("parameters", parameters)
    info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, ensure_ascii=False, default=str))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def read_provenance(path: Path) -> dict | None:
    """The JSON provenance of an sdbatch PNG, or None when the file is missing, partial or not ours."""
    try:
        with Image.open(path) as image:
            image.load()  # reads to the end: a truncated file raises here
            return json.loads(image.info[PROVENANCE_KEY])
    except Exception:
        return None


def stage_file(folder: Path, name: str, data: bytes) -> Path:
    """Write data to a fresh temporary file in folder, fsynced, readable by the team (the caller renames it)."""
    fd, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{name}-", dir=folder)  # named: cleanable per file
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = stage_file(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def temp_files(folder: Path, name: str = "") -> list[Path]:
    """Leftovers of writes a crashed run never finished (all of the folder's, or those for one file name)."""
    return list(folder.glob(f"{TEMP_PREFIX}{name}*")) if folder.is_dir() else []


def remove_temp_files(folder: Path, name: str = "") -> int:
    """Delete leftovers of writes a crashed run never finished; returns how many."""
    leftovers = temp_files(folder, name)
    for temp in leftovers:
        temp.unlink(missing_ok=True)
    return len(leftovers)


class ImageWriter:
    """Encodes and writes PNGs on worker threads; each submit returns a future of the seconds it took."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="sdbatch-write")

    def submit(self, path: Path, pixels, parameters: str, provenance: dict, lease) -> Future:
        """Encode and write one image: staged in the lease's folder, renamed into place only while it holds."""
        return self.pool.submit(self._write, path, pixels, parameters, provenance, lease)

    @staticmethod
    def _write(path: Path, pixels, parameters: str, provenance: dict, lease) -> float:
        start = time.perf_counter()
        data = encode_png(np.asarray(pixels), parameters, provenance)
        path.parent.mkdir(parents=True, exist_ok=True)
        lease.commit(stage_file(lease.staging, path.name, data), path)
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def describe_os_error(error: BaseException) -> str:
    """Plain words for the usual disk problems: '... is a file, not a folder', 'no space left', ..."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and getattr(error, "filename", None):
        return f"{error.strerror}: {error.filename} (a file is where a folder should be)"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    return str(error) or type(error).__name__
