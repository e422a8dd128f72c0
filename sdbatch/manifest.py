"""Read and validate the Parquet manifest, and expand its rows into ImageJobs."""

from __future__ import annotations

import gc
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sdbatch import SdbatchError

KNOWN_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "num_images")
ON_INVALID_CHOICES = ("error", "skip")
MAX_LISTED = 10
MAX_SEED = 2**63 - 1  # the ledger stores seeds as int64

TEXT_COLUMNS = ("negative_prompt",)
WHOLE_NUMBER_COLUMNS = ("seed", "width", "height", "steps", "num_images")


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
    """One image to render."""

    id: str
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    extra: dict


@dataclass(frozen=True)
class SkippedRow:
    """An invalid row under on_invalid=skip."""

    id: str
    reason: str
    prompt: str | None
    extra: dict


@dataclass
class Manifest:
    path: str
    jobs: list[ImageJob]
    skipped: list[SkippedRow]
    num_rows: int


@dataclass
class _Problem:
    """One kind of invalid row: which rows, and how to name them."""

    column: str
    what: str  # completes "3 rows have ..."
    reason: str  # the SkippedRow reason
    bad: np.ndarray  # bool per row
    listed: list[str] | None = None  # names to show instead of the bad rows' ids
    listed_as: str = "ids"


def derive_seed(run_seed: int, row_id: str) -> int:
    """A seed for a row with a null seed: stable per (run seed, id), whatever other rows exist."""
    digest = hashlib.sha256(f"{run_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def read_manifest(path, defaults: Defaults, on_invalid: str = "error") -> Manifest:
    path = str(path)
    if on_invalid not in ON_INVALID_CHOICES:
        raise SdbatchError(f"on_invalid must be 'error' or 'skip', not {on_invalid!r}.")
    table = _read_table(path)
    if table.num_rows == 0:
        raise SdbatchError(f"{path} has no rows: the manifest needs at least one row with a prompt.")
    _check_columns(path, table)
    columns = {name: _normalised(name, table.column(name)) for name in KNOWN_COLUMNS if name in table.column_names}
    ids, problems = _ids(columns.get("id"), table.num_rows)
    problems += _prompt_problems(columns["prompt"])
    problems += _number_problems(columns)
    problems += _seed_problems(columns)
    bad = np.zeros(table.num_rows, dtype=bool)
    for problem in problems:
        bad |= problem.bad
    if bad.any() and on_invalid == "error":
        raise SdbatchError(_invalid_rows_message(path, problems, ids))
    extra_table = table.drop_columns([name for name in table.column_names if name in KNOWN_COLUMNS])
    skipped = _skipped_rows(problems, bad, ids, columns["prompt"], extra_table)
    good = pa.array(~bad)
    jobs = _jobs(
        ids.filter(good).to_pylist(),
        {name: column.filter(good) for name, column in columns.items()},
        extra_table.filter(good),
        defaults,
    )
    return Manifest(path=path, jobs=jobs, skipped=skipped, num_rows=table.num_rows)


def _read_table(path: str) -> pa.Table:
    if not os.path.exists(path):
        raise SdbatchError(f"The manifest {path} does not exist.")
    if not os.path.isfile(path):
        raise SdbatchError(f"The manifest {path} is not a file (a Parquet file is needed).")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise SdbatchError(f"{path} is not a Parquet file: {error}") from None


def _check_columns(path: str, table: pa.Table) -> None:
    names = table.column_names
    if "prompt" not in names:
        found = ", ".join(repr(name) for name in names) or "none"
        raise SdbatchError(f"{path} has no 'prompt' column (the columns found are: {found}).")
    problems = []
    for name in KNOWN_COLUMNS:
        if names.count(name) > 1:
            problems.append(f"column '{name}' appears {names.count(name)} times")
        elif name in names and not _type_fits(name, table.schema.field(name).type):
            problems.append(f"column '{name}' has type {table.schema.field(name).type}, but {_type_needed(name)}")
    if problems:
        raise SdbatchError(f"{path}: {'; '.join(problems)}. Fix the column types and run again.")


def _value_type(arrow_type: pa.DataType) -> pa.DataType:
    return arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type


def _is_text(arrow_type: pa.DataType) -> bool:
    arrow_type = _value_type(arrow_type)
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type)


def _is_number(arrow_type: pa.DataType) -> bool:
    arrow_type = _value_type(arrow_type)
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def _type_fits(name: str, arrow_type: pa.DataType) -> bool:
    if name == "prompt" or pa.types.is_null(arrow_type):
        return True  # a non-text prompt makes its rows invalid rather than the file
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


def _normalised(name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Decode dictionaries, and give all-null columns the type their values would have."""
    arrow_type = column.type
    if pa.types.is_dictionary(arrow_type):
        return column.cast(arrow_type.value_type)
    if pa.types.is_null(arrow_type):
        return column.cast(pa.string() if name in ("id", "prompt") + TEXT_COLUMNS else pa.float64())
    if pa.types.is_string_view(arrow_type):
        return column.cast(pa.string())
    if pa.types.is_floating(arrow_type):
        return column.cast(pa.float64())
    return column


def _null_mask(column: pa.ChunkedArray) -> np.ndarray:
    return column.is_null().to_numpy(zero_copy_only=False)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """The column's values; nulls become 0 (callers mask them out)."""
    return pc.fill_null(column, 0).to_numpy()


def _is_whole(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return np.isfinite(values) & (values == np.floor(values))
    return np.ones(len(values), dtype=bool)


def _ids(column: pa.ChunkedArray | None, num_rows: int) -> tuple[pa.ChunkedArray, list[_Problem]]:
    """The row ids as text (null for a null id), and the id problems."""
    if column is None:
        return pa.chunked_array([pa.array([str(row) for row in range(num_rows)])]), []
    problems = []
    if pa.types.is_floating(column.type):
        whole = _is_whole(_numpy(column)) | _null_mask(column)
        problems.append(_Problem("id", "an id that is not a whole number", "id is not a whole number", ~whole))
        values = column.to_pylist()
        texts = [None if v is None else str(int(v)) if whole_row else str(v) for v, whole_row in zip(values, whole)]
        ids = pa.chunked_array([pa.array(texts, pa.string())])
    else:
        ids = column.cast(pa.string())
    null = _null_mask(column)
    if null.any():
        rows = [str(row) for row in np.flatnonzero(null)]
        problems.append(_Problem("id", "a null id", "null id", null, listed=rows, listed_as="row numbers"))
    counts = pc.value_counts(ids.drop_null())
    duplicated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        bad = pc.fill_null(pc.is_in(ids, value_set=duplicated), False).to_numpy(zero_copy_only=False)
        problems.append(
            _Problem("id", "an id that another row also has", "duplicate id", bad,
                     listed=duplicated.to_pylist(), listed_as="duplicated ids")
        )
    return ids, problems


def _prompt_problems(prompts: pa.ChunkedArray) -> list[_Problem]:
    if not _is_text(prompts.type):
        everything = np.ones(len(prompts), dtype=bool)
        what = f"a prompt that is not text (the column holds {prompts.type})"
        return [_Problem("prompt", what, "prompt is not text", everything)]
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(prompts)), 0)
    bad = pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
    return [_Problem("prompt", "an empty or null prompt", "empty or null prompt", bad)]


def _multiple_of_8(values: np.ndarray) -> np.ndarray:
    return (values > 0) & (values % 8 == 0)


def _at_least_1(values: np.ndarray) -> np.ndarray:
    return values >= 1


# column -> (completes "3 rows have ...", SkippedRow reason, which whole values are fine)
WHOLE_NUMBER_CHECKS = {
    "width": ("a width that is not a positive multiple of 8", "width is not a positive multiple of 8", _multiple_of_8),
    "height": ("a height that is not a positive multiple of 8", "height is not a positive multiple of 8", _multiple_of_8),
    "steps": ("a steps value that is not a whole number of at least 1", "steps is not a whole number of at least 1", _at_least_1),
    "num_images": (
        "a num_images value that is not a whole number of at least 1",
        "num_images is not a whole number of at least 1",
        _at_least_1,
    ),
}


def _number_problems(columns: dict[str, pa.ChunkedArray]) -> list[_Problem]:
    problems = []
    for name, (what, reason, in_range) in WHOLE_NUMBER_CHECKS.items():
        if name in columns:
            values = _numpy(columns[name])
            with np.errstate(invalid="ignore"):
                fine = _is_whole(values) & in_range(values)
            problems.append(_Problem(name, what, reason, ~fine & ~_null_mask(columns[name])))
    if "guidance_scale" in columns:
        column = columns["guidance_scale"]
        bad = ~np.isfinite(_numpy(column).astype(np.float64)) & ~_null_mask(column)
        problems.append(_Problem("guidance_scale", "a guidance_scale that is not a finite number",
                                 "guidance_scale is not a finite number", bad))
    return problems


def _seed_problems(columns: dict[str, pa.ChunkedArray]) -> list[_Problem]:
    """Seeds must be whole, >= 0, and leave room for seed + image_index in int64."""
    if "seed" not in columns:
        return []
    counts = columns["num_images"].to_pylist() if "num_images" in columns else [None] * len(columns["seed"])
    bad = np.array(
        [seed is not None and not _seed_fits(seed, count) for seed, count in zip(columns["seed"].to_pylist(), counts)],
        dtype=bool,
    )
    what = "a seed that is negative, not whole, or too big for its images' seeds to fit in 64 bits"
    return [_Problem("seed", what, "seed is negative, not whole, or too big for 64 bits", bad)]


def _seed_fits(seed, count) -> bool:
    if isinstance(seed, float) and not (np.isfinite(seed) and seed == int(seed)):
        return False
    extra_images = int(count) - 1 if isinstance(count, (int, float)) and np.isfinite(count) and count >= 1 else 0
    return 0 <= seed and int(seed) + extra_images <= MAX_SEED


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


def _labels(ids: pa.ChunkedArray, rows: np.ndarray) -> list[str]:
    """The ids of these rows; a row without an id is named by its row number."""
    return [row_id if row_id is not None else f"row {row}" for row, row_id in zip(rows, ids.take(rows).to_pylist())]


def _invalid_rows_message(path: str, problems: list[_Problem], ids: pa.ChunkedArray) -> str:
    parts = []
    for problem in problems:
        count = int(problem.bad.sum())
        if count == 0:
            continue
        if problem.listed is None:
            listing = _listing(_labels(ids, np.flatnonzero(problem.bad)[:MAX_LISTED]), count)
        else:
            listing = _listing(problem.listed, len(problem.listed))
        rows = "1 row has" if count == 1 else f"{count} rows have"
        parts.append(f"{rows} {problem.what} (column '{problem.column}', {problem.listed_as}: {listing})")
    return (
        f"{path}: {'; '.join(parts)}. "
        "Fix these rows, or pass on_invalid=skip to render the others and record these as skipped."
    )


def _skipped_rows(
    problems: list[_Problem], bad: np.ndarray, ids: pa.ChunkedArray, prompts: pa.ChunkedArray, extra_table: pa.Table
) -> list[SkippedRow]:
    rows = np.flatnonzero(bad)
    if len(rows) == 0:
        return []
    reasons = {int(row): [] for row in rows}
    for problem in problems:
        for row in np.flatnonzero(problem.bad):
            reasons[int(row)].append(problem.reason)
    texts = prompts.take(rows).to_pylist() if _is_text(prompts.type) else [None] * len(rows)
    extras = _extras(extra_table.take(rows), len(rows))
    return [
        SkippedRow(id=label, reason="; ".join(reasons[int(row)]), prompt=text, extra=extra)
        for row, label, text, extra in zip(rows, _labels(ids, rows), texts, extras)
    ]


def _extras(extra_table: pa.Table, count: int) -> list[dict]:
    """Passthrough values per row (a table without columns also loses its row count when filtered)."""
    if extra_table.num_columns == 0:
        return [{} for _ in range(count)]
    return extra_table.to_pylist()


def _filled(columns: dict[str, pa.ChunkedArray], name: str, default, count: int, convert=None) -> list:
    """The column's values with nulls replaced by the default (int columns may arrive as whole floats)."""
    if name not in columns:
        return [default] * count
    values = [default if value is None else value for value in columns[name].to_pylist()]
    return [convert(value) for value in values] if convert and pa.types.is_floating(columns[name].type) else values


def _jobs(ids: list[str], columns: dict[str, pa.ChunkedArray], extra_table: pa.Table, defaults: Defaults) -> list[ImageJob]:
    count = len(ids)
    prompts = columns["prompt"].to_pylist()
    negatives = _filled(columns, "negative_prompt", defaults.negative_prompt, count)
    seeds = _filled(columns, "seed", None, count, lambda seed: seed if seed is None else int(seed))
    widths = _filled(columns, "width", defaults.width, count, int)
    heights = _filled(columns, "height", defaults.height, count, int)
    steps = _filled(columns, "steps", defaults.steps, count, int)
    scales = [float(scale) for scale in _filled(columns, "guidance_scale", defaults.guidance_scale, count)]
    num_images = _filled(columns, "num_images", 1, count, int)
    extras = _extras(extra_table, count)
    jobs = []
    # A million new objects make the cyclic GC rescan them over and over; they hold no cycles.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for row, row_id in enumerate(ids):
            seed = derive_seed(defaults.seed, row_id) if seeds[row] is None else seeds[row]
            texts = (prompts[row], negatives[row])
            settings = (widths[row], heights[row], steps[row], scales[row], extras[row])
            for image_index in range(num_images[row]):
                jobs.append(ImageJob(row_id, image_index, *texts, seed + image_index, *settings))
    finally:
        if gc_was_enabled:
            gc.enable()
    return jobs
