"""The Parquet manifest: find its files, read them in columnar chunks, normalise the known columns, flag bad rows."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from sdbatch import SdbatchError, first_line
from sdbatch.ledger import CORE_COLUMNS

KNOWN_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "num_images",
                 "lora", "lora_scale")
TEXT_COLUMNS = ("negative_prompt",)
WHOLE_NUMBER_COLUMNS = ("seed", "width", "height", "steps", "num_images")
MAX_LISTED = 10
MAX_SEED = 2**63 - 1  # the ledger stores seeds as int64
CHUNK_ROWS = 262_144  # rows read at a time: bounds memory whatever the manifest's size
ROW_COLUMNS = pa.schema([  # every plan row has these, then the passthrough columns
    ("row", pa.int64()), ("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
    ("seed", pa.int64()), ("width", pa.int64()), ("height", pa.int64()), ("steps", pa.int64()),
    ("guidance_scale", pa.float64()), ("num_images", pa.int64()), ("lora", pa.string()), ("lora_scale", pa.float64()),
    ("reason", pa.string()),
])


@dataclass(frozen=True)
class Defaults:
    """Run-level values for null cells."""
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int  # the run seed: a row with a null seed gets derive_seed(seed, id)
    negative_prompt: str = ""


@dataclass(frozen=True)
class ImageJob:
    """One image to render, and where its result goes."""
    id: str
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    extra: dict  # the row's passthrough values, for the image's provenance
    shard: int = 0
    content_key: str = ""
    row: int = 0  # its row among the shard's plan rows
    lora: str | None = None  # the row's LoRA file, as the manifest gives it
    lora_scale: float | None = None  # its scale (1.0 for a null lora_scale); None without a LoRA
    lora_sha256: str | None = None  # the file's fingerprint (weights.lora_fingerprint)

    @property
    def adapter(self) -> tuple | None:
        """What decides the row's LoRA: (fingerprint, scale), or None without one."""
        return None if self.lora is None else (self.lora_sha256, self.lora_scale)


def derive_seed(run_seed: int, row_id: str) -> int:
    """A seed for a row with a null seed: stable per (run seed, id), whatever other rows exist."""
    digest = hashlib.sha256(f"{run_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ---------------------------------------------------------------- problems: which rows are bad, and why
@dataclass
class Problem:
    column: str
    what: str  # completes "3 rows have ..."
    listed_as: str = "ids"
    count: int = 0  # names seen (rows, or distinct ids for duplicates)
    examples: list = field(default_factory=list)
    rows: int | None = None  # rows affected, when that differs from count

    def add(self, names: list[str]) -> None:
        self.count += len(names)
        self.examples += names[:MAX_LISTED - len(self.examples)]


class Problems:
    """Bad rows seen so far, by kind, with the first few names of each: enough for one paragraph."""

    def __init__(self):
        self.kinds: dict[str, Problem] = {}

    def add(self, reason: str, column: str, what: str, names: list[str], listed_as: str = "ids") -> None:
        if names:
            self.kinds.setdefault(reason, Problem(column, what, listed_as)).add(names)

    @property
    def count(self) -> int:
        return sum(p.count for p in self.kinds.values())

    def message(self, where: str) -> str:
        parts = []
        for problem in self.kinds.values():
            affected = problem.count if problem.rows is None else problem.rows
            rows = "1 row has" if affected == 1 else f"{affected} rows have"
            listing = _listing(problem.examples, problem.count)
            parts.append(f"{rows} {problem.what} (column '{problem.column}', {problem.listed_as}: {listing})")
        return (f"{where}: {'; '.join(parts)}. "
                "Fix these rows, or pass on_invalid=skip to render the others and record these as skipped.")

    def to_json(self) -> list:
        return [[reason, p.column, p.what, p.listed_as, p.count, p.examples, p.rows]
                for reason, p in self.kinds.items()]

    @classmethod
    def from_json(cls, data: list) -> "Problems":
        problems = cls()
        for reason, column, what, listed_as, count, examples, rows in data:
            problems.kinds[reason] = Problem(column, what, listed_as, count, examples, rows)
        return problems


# ---------------------------------------------------------------- the files
class Manifest:
    """One Parquet file, a folder of part files (Spark/Hive style, partition columns carried through) or a glob."""

    def __init__(self, path, max_steps: int | None = None, min_size: int = 8):
        self.path = str(path)
        self.max_steps, self.min_size = max_steps, min_size  # what the scheduler and the model can render
        self.dataset = _open_dataset(self.path)
        self.files = list(self.dataset.files)
        self.num_rows = sum(_footer(file).num_rows for file in self.files)
        if self.num_rows == 0:
            raise SdbatchError(f"{self.path} has no rows: the manifest needs at least one row with a prompt.")
        self.columns = self.dataset.schema.names
        self.passthrough = passthrough_names([c for c in self.columns if c not in KNOWN_COLUMNS])
        _check_columns(self.path, self.dataset.schema)

    def fingerprint(self) -> str:
        """What identifies today's manifest without reading it: each file's path, size, mtime and Parquet footer."""
        parts = []
        for file in self.files:
            stat = os.stat(file)
            parts.append([os.path.relpath(file, _base(self.path)), stat.st_size, stat.st_mtime_ns,
                          hashlib.sha256(_footer_bytes(file)).hexdigest()])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def misspelled(self) -> list[str]:
        """Warnings for columns that look like a known one but are carried through unused."""
        warnings = []
        for name in self.columns:
            if name in KNOWN_COLUMNS:
                continue
            close = difflib.get_close_matches(name.lower(), KNOWN_COLUMNS, n=1, cutoff=0.6)
            close = close or [k for k in KNOWN_COLUMNS if name.lower().startswith(k) or k.startswith(name.lower())]
            if close:
                warnings.append(f"column '{name}' is not one sdbatch reads (did you mean '{close[0]}'?); it is "
                                "carried into the ledger unchanged")
        return warnings

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[str, pa.Table]]:
        """(file, normalised rows) in manifest order, `rows` at a time."""
        first = 0
        for fragment in self.dataset.get_fragments():
            try:
                batches = fragment.to_batches(schema=self.dataset.schema, batch_size=rows, batch_readahead=1,
                                              fragment_readahead=1)  # one chunk in memory at a time
                for batch in batches:
                    table = pa.Table.from_batches([batch])
                    yield fragment.path, self._normalised(table, first)
                    first += table.num_rows
            except (pa.ArrowException, OSError) as error:
                raise SdbatchError(f"{fragment.path} (part of the manifest {self.path}) cannot be read: "
                                   f"{first_line(error)}") from None

    def _normalised(self, table: pa.Table, first: int) -> pa.Table:
        count = table.num_rows
        rows = pa.array(np.arange(first, first + count, dtype=np.int64))
        columns = {"row": rows}
        bad = _BadRows(count)
        columns["id"] = _ids(table, rows, bad)
        columns["prompt"] = _prompts(table, bad)
        columns["negative_prompt"] = _text_or_null(table, "negative_prompt", bad)
        for name in WHOLE_NUMBER_COLUMNS:
            columns[name] = _whole_numbers(table, name, bad)
        self._within_limits(columns, bad)
        columns["guidance_scale"] = _finite_numbers(table, "guidance_scale", bad)
        columns["lora"], columns["lora_scale"] = _lora(table, bad)
        _check_seeds(columns["seed"], columns["num_images"], table, bad)
        columns["reason"] = bad.reasons()
        normal = pa.table(columns, schema=ROW_COLUMNS)
        for original, renamed in self.passthrough.items():
            normal = normal.append_column(renamed, table.column(original).combine_chunks())
        return normal


    def _within_limits(self, columns: dict, bad: "_BadRows") -> None:
        """Sizes below the model's smallest and steps beyond what the scheduler can place are invalid rows too."""
        for name in ("width", "height"):
            values = pc.fill_null(columns[name], self.min_size).to_numpy(zero_copy_only=False)
            bad.mark(values < self.min_size, f"{name} is below the model's minimum of {self.min_size}")
        if self.max_steps is not None:
            steps = pc.fill_null(columns["steps"], 1).to_numpy(zero_copy_only=False)
            bad.mark(steps > self.max_steps, f"steps is more than the scheduler can place (at most {self.max_steps})")


def passthrough_names(names: list[str]) -> dict[str, str]:
    """Manifest column -> ledger column: one named like a ledger or plan column gets `manifest_` prefixes until
    its name is free (so `status` and `manifest_status` both survive)."""
    reserved = set(CORE_COLUMNS) | set(ROW_COLUMNS.names) | {"shard"}
    taken = reserved | set(names)
    renamed = {}
    for name in names:
        new = name
        while new in reserved or (new != name and new in taken):
            new = f"manifest_{new}"
        taken.add(new)
        renamed[name] = new
    return renamed


# ---------------------------------------------------------------- opening
def _base(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def _open_dataset(path: str) -> ds.Dataset:
    if any(ch in path for ch in "*?["):
        import glob
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise SdbatchError(f"The manifest pattern {path} matches no files.")
    elif not os.path.exists(path):
        raise SdbatchError(f"The manifest {path} does not exist.")
    else:
        files = None
    try:
        if files is not None:
            base = path[:min(path.index(ch) for ch in "*?[" if ch in path)].rpartition(os.sep)[0] or "."
            return ds.dataset(files, format="parquet", partitioning=ds.partitioning(flavor="hive"),
                              partition_base_dir=base)
        dataset = ds.dataset(path, format="parquet", partitioning="hive", ignore_prefixes=[".", "_"])
    except (pa.ArrowException, OSError) as error:
        raise SdbatchError(_not_parquet(path, error)) from None
    if os.path.isdir(path) and not dataset.files:
        raise SdbatchError(f"The manifest folder {path} holds no Parquet files (part-*.parquet or similar).")
    for file in dataset.files:
        try:
            _footer(file)
        except (pa.ArrowException, OSError) as error:
            raise SdbatchError(_not_parquet(file, error)) from None
    return dataset


def _not_parquet(path: str, error: Exception) -> str:
    return f"{path} is not a Parquet file: {first_line(error)}"


def _footer(file: str):
    import pyarrow.parquet as pq
    return pq.ParquetFile(file).metadata


def _footer_bytes(file: str) -> bytes:
    with open(file, "rb") as handle:
        handle.seek(-8, os.SEEK_END)
        length = int.from_bytes(handle.read(4), "little")
        handle.seek(-8 - length, os.SEEK_END)
        return handle.read(length)


def _check_columns(path: str, schema: pa.Schema) -> None:
    names = schema.names
    if "prompt" not in names:
        found = ", ".join(repr(name) for name in names) or "none"
        raise SdbatchError(f"{path} has no 'prompt' column (the columns found are: {found}).")
    problems = []
    for name in KNOWN_COLUMNS:
        if names.count(name) > 1:
            problems.append(f"column '{name}' appears {names.count(name)} times")
        elif name in names and not _type_fits(name, schema.field(name).type):
            problems.append(f"column '{name}' has type {schema.field(name).type}, but {_type_needed(name)}")
    if problems:
        raise SdbatchError(f"{path}: {'; '.join(problems)}. Fix the column types and run again.")


def _value_type(arrow_type: pa.DataType) -> pa.DataType:
    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def _is_text(arrow_type: pa.DataType) -> bool:
    t = _value_type(arrow_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number(arrow_type: pa.DataType) -> bool:
    t = _value_type(arrow_type)
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _type_fits(name: str, arrow_type: pa.DataType) -> bool:
    if name in ("prompt", "lora", "lora_scale") or pa.types.is_null(arrow_type):
        return True  # a wrongly typed prompt or LoRA cell makes its rows invalid rather than the file
    if name == "id":
        return _is_text(arrow_type) or _is_number(arrow_type)
    if name in TEXT_COLUMNS:
        return _is_text(arrow_type)
    return _is_number(arrow_type)


def _type_needed(name: str) -> str:
    if name == "id":
        return "it must hold text or whole numbers"
    if name in TEXT_COLUMNS:
        return "it must hold text"
    if name in WHOLE_NUMBER_COLUMNS:
        return "it must hold whole numbers"
    return "it must hold numbers"


# ---------------------------------------------------------------- normalising, vectorised
class _BadRows:
    """Why each row of a chunk is invalid ("" = valid), built up column by column."""

    def __init__(self, count: int):
        self.texts = np.full(count, "", dtype=object)

    def mark(self, mask: np.ndarray, reason: str) -> None:
        if mask.any():
            self.texts[mask] = [f"{old}; {reason}" if old else reason for old in self.texts[mask]]

    @property
    def mask(self) -> np.ndarray:
        return self.texts != ""

    def reasons(self) -> pa.Array:
        return pa.array([text or None for text in self.texts], pa.string())


def _column(table: pa.Table, name: str) -> pa.Array | None:
    if name not in table.column_names:
        return None
    column = table.column(name).combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.string())
    return column


def _nulls(column: pa.Array) -> np.ndarray:
    return column.is_null().to_numpy(zero_copy_only=False)


def _valid_utf8(column: pa.Array, bad: _BadRows, reason: str) -> pa.Array:
    """The column with invalid UTF-8 cells nulled (and their rows marked): Parquet does not check encodings."""
    try:
        column.validate(full=True)
        return column
    except pa.ArrowInvalid:
        pass
    values = column.cast(pa.binary()).to_pylist()
    broken = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        try:
            value is None or value.decode("utf-8")
        except UnicodeDecodeError:
            broken[i] = True
    bad.mark(broken, reason)
    cleaned = [None if b or v is None else v.decode("utf-8") for v, b in zip(values, broken)]
    return pa.array(cleaned, pa.string())


def _ids(table: pa.Table, rows: pa.Array, bad: _BadRows) -> pa.Array:
    column = _column(table, "id")
    if column is None:  # no id column: the row number is the id
        return pc.cast(rows, pa.string())
    if pa.types.is_null(column.type):
        column = column.cast(pa.string())
    if pa.types.is_floating(column.type):
        values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(values) & (values == np.floor(values))
        bad.mark(~whole & ~_nulls(column), "id is not a whole number")
        as_int = pc.cast(pc.if_else(pa.array(whole), column, None), pa.int64(), safe=False)
        column = pc.if_else(pa.array(whole), pc.cast(as_int, pa.string()), pc.cast(column, pa.string()))
    elif not _is_text(column.type):
        column = pc.cast(column, pa.string())
    else:
        column = _valid_utf8(column, bad, "id is not valid UTF-8")
    null = _nulls(column)
    bad.mark(null & ~bad.mask, "null id")
    return column


def _prompts(table: pa.Table, bad: _BadRows) -> pa.Array:
    column = _column(table, "prompt")
    if not (_is_text(column.type) or pa.types.is_null(column.type)):
        bad.mark(np.ones(len(column), dtype=bool), f"prompt is not text (the column holds {column.type})")
        return pa.nulls(len(column), pa.string())
    column = column.cast(pa.string()) if pa.types.is_null(column.type) else column
    column = _valid_utf8(column, bad, "prompt is not valid UTF-8")
    blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0), True)
    bad.mark(blank.to_numpy(zero_copy_only=False) & ~_invalid_utf8_rows(bad), "empty or null prompt")
    return column


def _invalid_utf8_rows(bad: _BadRows) -> np.ndarray:
    return np.array(["prompt is not valid UTF-8" in text for text in bad.texts], dtype=bool)


def _text_or_null(table: pa.Table, name: str, bad: _BadRows) -> pa.Array:
    column = _column(table, name)
    if column is None or pa.types.is_null(column.type):
        return pa.nulls(table.num_rows, pa.string())
    return _valid_utf8(column, bad, f"{name} is not valid UTF-8")


# column -> (SkippedRow reason, which whole values are fine)
WHOLE_NUMBER_RANGES = {
    "width": ("width is not a positive multiple of 8", lambda v: (v > 0) & (v % 8 == 0)),
    "height": ("height is not a positive multiple of 8", lambda v: (v > 0) & (v % 8 == 0)),
    "steps": ("steps is not a whole number of at least 1", lambda v: v >= 1),
    "num_images": ("num_images is not a whole number of at least 1", lambda v: v >= 1),
    "seed": ("seed is negative, not whole, or too big for 64 bits", lambda v: (v >= 0) & (v <= MAX_SEED)),
}


def _whole_numbers(table: pa.Table, name: str, bad: _BadRows) -> pa.Array:
    """An int64 column: whole values in range kept, the rest null (and their rows marked)."""
    column = _column(table, name)
    if column is None or pa.types.is_null(column.type):
        return pa.nulls(table.num_rows, pa.int64())
    null = _nulls(column)
    values = pc.fill_null(column, 0).to_numpy(zero_copy_only=False)
    reason, in_range = WHOLE_NUMBER_RANGES[name]
    with np.errstate(invalid="ignore", over="ignore"):
        if values.dtype.kind == "f":
            fine = np.isfinite(values) & (values == np.floor(values)) & in_range(values)
        else:
            fine = in_range(values.astype(np.float64)) & (values >= 0 if values.dtype.kind == "u" else True)
            if values.dtype == np.uint64:
                fine &= values <= np.uint64(MAX_SEED)
    bad.mark(~fine & ~null, reason)
    keep = fine & ~null
    as_int = np.where(keep, values, 0).astype(np.int64)
    return pa.array(as_int, pa.int64(), mask=~keep)


def _finite_numbers(table: pa.Table, name: str, bad: _BadRows) -> pa.Array:
    """A float64 column: finite values kept, the rest null (and their rows marked)."""
    column = _column(table, name)
    if column is None or pa.types.is_null(column.type):
        return pa.nulls(table.num_rows, pa.float64())
    if not _is_number(column.type):  # only where _type_fits lets the file through (lora_scale)
        bad.mark(~_nulls(column), f"{name} is not a number (the column holds {column.type})")
        return pa.nulls(table.num_rows, pa.float64())
    column = column.cast(pa.float64())
    finite = np.isfinite(pc.fill_null(column, 0.0).to_numpy(zero_copy_only=False))
    bad.mark(~finite & ~_nulls(column), f"{name} is not a finite number")
    return pc.if_else(pa.array(finite), column, None)


def _lora(table: pa.Table, bad: _BadRows) -> tuple[pa.Array, pa.Array]:
    """The LoRA path (text) and its scale (a finite number); a scale needs a path."""
    path = _column(table, "lora")
    if path is None or pa.types.is_null(path.type):
        path = pa.nulls(table.num_rows, pa.string())
    elif not _is_text(path.type):
        bad.mark(~_nulls(path), f"lora is not text (the column holds {path.type})")
        path = pa.nulls(table.num_rows, pa.string())
    else:
        path = _valid_utf8(path, bad, "lora is not valid UTF-8")
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(path)), 0), False)
        bad.mark(blank.to_numpy(zero_copy_only=False), "lora is empty")
    scale = _finite_numbers(table, "lora_scale", bad)
    bad.mark(~_nulls(scale) & _nulls(path) & ~bad.mask, "lora_scale without a lora")
    return path, scale


def _check_seeds(seeds: pa.Array, counts: pa.Array, table: pa.Table, bad: _BadRows) -> None:
    """seed + num_images - 1 must still fit in int64."""
    seed = pc.fill_null(seeds, 0).to_numpy(zero_copy_only=False)
    extra = np.maximum(pc.fill_null(counts, 1).to_numpy(zero_copy_only=False) - 1, 0)
    overflow = seed > MAX_SEED - extra
    bad.mark(overflow & ~_nulls(seeds), WHOLE_NUMBER_RANGES["seed"][0])


# ---------------------------------------------------------------- naming rows in messages
def _show(row_id: str) -> str:
    """An id as it reads in a one-paragraph message."""
    if len(row_id) > 60:
        row_id = row_id[:57] + "..."
    if not row_id or not row_id.isprintable() or row_id.strip() != row_id:
        return repr(row_id)
    return row_id


def _listing(names: list[str], total: int) -> str:
    shown = ", ".join(_show(name) for name in names[:MAX_LISTED])
    more = total - min(len(names), MAX_LISTED)
    return f"{shown} and {more} more" if more > 0 else shown


def labels(rows: pa.Table) -> list[str]:
    """How to name rows in a message: the id, or the row number when the id is unusable."""
    return [row_id if row_id is not None else f"row {row}"
            for row_id, row in zip(rows.column("id").to_pylist(), rows.column("row").to_pylist())]


# (reason, column, completes "3 rows have ...")
PROBLEM_WORDING = {
    "null id": ("id", "a null id"),
    "id is not a whole number": ("id", "an id that is not a whole number"),
    "id is not valid UTF-8": ("id", "an id that is not valid UTF-8"),
    "duplicate id": ("id", "an id that another row also has"),
    "empty or null prompt": ("prompt", "an empty or null prompt"),
    "prompt is not valid UTF-8": ("prompt", "a prompt that is not valid UTF-8"),
    "negative_prompt is not valid UTF-8": ("negative_prompt", "a negative_prompt that is not valid UTF-8"),
    "width is not a positive multiple of 8": ("width", "a width that is not a positive multiple of 8"),
    "height is not a positive multiple of 8": ("height", "a height that is not a positive multiple of 8"),
    "steps is not a whole number of at least 1": ("steps", "a steps value that is not a whole number of at least 1"),
    "num_images is not a whole number of at least 1": (
        "num_images", "a num_images value that is not a whole number of at least 1"),
    "seed is negative, not whole, or too big for 64 bits": (
        "seed", "a seed that is negative, not whole, or too big for its images' seeds to fit in 64 bits"),
    "guidance_scale is not a finite number": ("guidance_scale", "a guidance_scale that is not a finite number"),
    "lora is not valid UTF-8": ("lora", "a lora that is not valid UTF-8"),
    "lora is empty": ("lora", "an empty lora (write null for none)"),
    "lora_scale is not a finite number": ("lora_scale", "a lora_scale that is not a finite number"),
    "lora_scale without a lora": ("lora_scale", "a lora_scale but no lora (the scale needs a LoRA file)"),
}
TYPE_PROBLEMS = {"prompt is not text": ("prompt", "a prompt that is not text"),
                 "lora is not text": ("lora", "a lora that is not text"),
                 "lora_scale is not a number": ("lora_scale", "a lora_scale that is not a number")}


def _wording(reason: str) -> tuple[str, str]:
    """(column, what) for a reason like "width is below the model's minimum of 64"."""
    column = reason.split(" ")[0]
    noun = f"{column} value" if column == "steps" else column
    return column, "a " + reason.replace(f"{column} is ", f"{noun} that is ", 1)


def record_problems(rows: pa.Table, problems: Problems) -> None:
    """Add a chunk's bad rows to the running tally (duplicates are counted by the plan, across chunks)."""
    bad = rows.filter(pc.is_valid(rows.column("reason")))
    if bad.num_rows == 0:
        return
    names = labels(bad)
    by_reason: dict[str, list[str]] = {}
    for name, reasons in zip(names, bad.column("reason").to_pylist()):
        for reason in reasons.split("; "):
            by_reason.setdefault(reason, []).append(name)
    for reason, listed in by_reason.items():
        typed = next((start for start in TYPE_PROBLEMS if reason.startswith(start)), None)
        if typed:
            column, what = TYPE_PROBLEMS[typed]
            problems.add(reason, column, what + reason.removeprefix(typed), listed)
            continue
        column, what = PROBLEM_WORDING.get(reason) or _wording(reason)
        listed_as = "row numbers" if reason == "null id" else "ids"
        if reason == "null id":
            listed = [name.removeprefix("row ") for name in listed]
        problems.add(reason, column, what, listed, listed_as)


def count_loras(rows: pa.Table, tally: dict) -> None:
    """Add a chunk's valid rows to {LoRA path: [rows, first few row names]}: the distinct files a manifest uses."""
    valid = rows.filter(pc.and_(pc.is_null(rows.column("reason")), pc.is_valid(rows.column("lora"))))
    for name, path in zip(labels(valid), valid.column("lora").to_pylist()):
        entry = tally.setdefault(path, [0, []])
        entry[0] += 1
        if len(entry[1]) < MAX_LISTED:
            entry[1].append(name)


def lora_problems(loras: dict, problem_of) -> Problems:
    """The rows whose LoRA file cannot be used, one kind per file: problem_of(path) says why, or None."""
    problems = Problems()
    for path, (count, names) in loras.items():
        problem = problem_of(path)
        if problem:
            problems.add(f"lora file {problem}: {path}", "lora", f"a lora file that {problem} ({path})", names)
            problems.kinds[f"lora file {problem}: {path}"].count = count
    return problems
