"""python -m sdbatch.report output_dir=DIR: a self-contained HTML report built from a run's ledgers.

Reads every DIR/ledger/*.parquet (also while a run is still writing them), writes DIR/report/index.html
(summary, charts as inline SVG, a contact sheet of inline thumbnails linking to the full images),
optionally DIR/report/merged.parquet, and prints a short summary.
"""

import base64
import html
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import hydra
import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from sdbatch import SdbatchError, cli, settings
from sdbatch.cost import DEVICE_STAGES, amount, cost_lines, gpu_hour_figures
from sdbatch.ledger import CORE_SCHEMA, SETTINGS_FILE

STAGE_COLUMNS = ["text_encode_s", "denoise_s", "vae_decode_s", "write_s"]
REQUIRED_COLUMNS = [
    "id", "image_index", "seed", "prompt", "image_path", "status", "reason", "truncated",
    "attention_backend", "shard", "worker_index", "device", "batch_size", "finished_at", *STAGE_COLUMNS,
]
SHEET_COLUMNS = ["id", "image_index", "seed", "prompt", "image_path", "status", "reason", "truncated", "shard"]
CHART_STYLE = {
    "svg.fonttype": "none",  # keep text as <text>: smaller SVG, drawn in the page's font
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.prop_cycle": matplotlib.cycler(color=["#3b6fd4", "#e07b39", "#3a9e6a", "#c2455b", "#8a63c9", "#6b7785"]),
    "axes.edgecolor": "#b8bec8",
    "axes.grid": True,
    "grid.color": "#e6e9ee",
    "xtick.color": "#555d69",
    "ytick.color": "#555d69",
}
MAX_LINE_POINTS = 400  # per worker in the throughput chart, so a million-image run stays a small SVG


# ---- reading ----

def list_ledgers(output_dir: Path) -> list[Path]:
    ledger_dir = output_dir / "ledger"
    if not ledger_dir.is_dir():
        raise SdbatchError(
            f"There is no ledger folder at {ledger_dir}. Point output_dir= at the folder a run wrote to "
            "(the one holding images/ and ledger/)."
        )
    # Names starting with "." are the writer's temp files, renamed into place when complete.
    paths = sorted(p for p in ledger_dir.glob("*.parquet") if not p.name.startswith("."))
    if not paths:
        raise SdbatchError(
            f"{ledger_dir} holds no ledgers (shard-*.parquet) yet. A run writes one per shard as it finishes "
            "batches; try again once it has rendered something."
        )
    return paths


def read_ledger(path: Path) -> pa.Table:
    table = pq.read_table(path)
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"not an sdbatch ledger, it lacks {', '.join(missing)}")
    return table


def read_ledgers(output_dir: Path) -> tuple[pa.Table, int, list[str]]:
    """All readable ledgers as one table, how many there were, and 'name: why' for each that was skipped."""
    paths = list_ledgers(output_dir)
    tables, unreadable = [], []
    for path in paths:
        try:
            tables.append(read_ledger(path))
        except (OSError, ValueError, pa.ArrowException) as err:  # vanished, replaced mid-read, or not a ledger
            unreadable.append(f"{path.name}: {err}")
    if not tables:
        raise SdbatchError(
            f"None of the {len(paths)} ledgers in {output_dir / 'ledger'} could be read: {'; '.join(unreadable)}."
        )
    try:
        # "permissive" lets a passthrough column that is all-null in one shard join its typed twin elsewhere.
        return typed(pa.concat_tables(tables, promote_options="permissive")), len(paths), unreadable
    except pa.ArrowException as err:
        raise SdbatchError(f"The ledgers in {output_dir / 'ledger'} do not fit together into one table: {err}.")


def typed(table: pa.Table) -> pa.Table:
    """Ledger columns that are null in every shard (stored as Parquet's null type) as their ledger types."""
    for field in CORE_SCHEMA:
        if field.name in table.column_names and pa.types.is_null(table.schema.field(field.name).type):
            index = table.column_names.index(field.name)
            table = table.set_column(index, field.name, table[field.name].cast(field.type))
    return table


# ---- numbers ----

def value_counts(column: pa.ChunkedArray) -> list[tuple]:
    """(value, count) for the non-null values, most common first."""
    pairs = [(item["values"], item["counts"]) for item in pc.value_counts(column.drop_null()).to_pylist()]
    return sorted(pairs, key=lambda pair: -pair[1])


def flagged_mask(table: pa.Table) -> pa.ChunkedArray:
    """Rows worth a look: failed, truncated prompt, or carrying a reason."""
    failed = pc.equal(table["status"], "failed")
    truncated = pc.fill_null(table["truncated"], False)
    return pc.or_(pc.or_(failed, truncated), pc.is_valid(table["reason"]))


def numbers(table: pa.Table, name: str, fill: float = 0.0) -> np.ndarray:
    return pc.fill_null(table[name], fill).to_numpy().astype(float)


def image_times(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per ok image with a finish time: (estimated start of its batch, finish), in epoch seconds.

    Stage seconds in the ledger are the batch's time shared among its images, so the batch took
    shared * batch_size; the write is the image's own.
    """
    finished = pc.cast(table["finished_at"], pa.int64()).to_numpy().astype(float) / 1e6
    shared = sum(numbers(table, name) for name in STAGE_COLUMNS[:-1])
    started = finished - shared * numbers(table, "batch_size", 1.0) - numbers(table, "write_s")
    return started, finished


def timed_images(table: pa.Table) -> pa.Table:
    """Rendered images (ok or failed) with a finish time, with started_s/finished_s columns added."""
    rendered = pc.is_in(table["status"], pa.array(["ok", "failed"]))
    timed = table.filter(pc.and_(rendered, pc.is_valid(table["finished_at"])))
    started, finished = image_times(timed)
    return timed.append_column("started_s", pa.array(started)).append_column("finished_s", pa.array(finished))


def rate(images: int, seconds: float | None) -> float | None:
    return images / seconds if seconds else None


def worker_keys(table: pa.Table) -> np.ndarray:
    """One integer per row naming its worker: its (worker_index, device) pair."""
    index = pc.fill_null(table["worker_index"], -1).to_numpy()
    device = pc.dictionary_encode(pc.fill_null(table["device"], "").combine_chunks()).indices.to_numpy()
    return index * (int(device.max(initial=0)) + 1) + device


# A worker's images fall into sessions: stretches of batches run back to back. An image starts a new session when
# its batch began more than max(SESSION_GAP_S, SESSION_GAP_BATCHES x the previous batch's time) after the worker's
# previous image finished. Within a run batches follow each other at once (a shard switch, a short lease wait);
# between runs there is at least a process start and a model load, and between nights a day. Sessions are found
# per worker (worker_index, device), so workers running at the same time never fill each other's gaps: a worker's
# time is the sum of its sessions, the folder's wall time the time covered by at least one session of any worker
# (each stretch of it is a "run" in the summary: the workers of one Slurm array overlap into one).
# What this leaves out is time with nothing in the ledger: a longer wait inside a run (for a lease held elsewhere),
# model loading, and the holes images re-rendered by a later run leave in an earlier session.
SESSION_GAP_S = 30.0
SESSION_GAP_BATCHES = 5
SESSION_SCHEMA = pa.schema([("worker_index", pa.int64()), ("device", pa.string()), ("start_s", pa.float64()),
                            ("end_s", pa.float64()), ("images", pa.int64())])


def session_table(timed: pa.Table) -> pa.Table:
    """One row per session of a worker: worker_index, device, start_s, end_s and its ok images."""
    if not len(timed):
        return SESSION_SCHEMA.empty_table()
    worker = worker_keys(timed)
    started, finished = timed["started_s"].to_numpy(), timed["finished_s"].to_numpy()
    order = np.lexsort((finished, worker))
    worker, started, finished = worker[order], started[order], finished[order]
    ok = pc.fill_null(pc.equal(timed["status"], "ok"), False).to_numpy().astype(np.int64)[order]
    # Sorted by finish within a worker, the previous image is the latest the worker had finished.
    allowed = np.maximum(SESSION_GAP_S, SESSION_GAP_BATCHES * (finished - started)[:-1])
    new = np.concatenate([[True], (worker[1:] != worker[:-1]) | (started[1:] - finished[:-1] > allowed)])
    firsts = np.flatnonzero(new)
    first_rows = pa.array(order[firsts])
    return pa.table({
        "worker_index": timed["worker_index"].take(first_rows), "device": timed["device"].take(first_rows),
        "start_s": np.minimum.reduceat(started, firsts), "end_s": np.maximum.reduceat(finished, firsts),
        "images": np.add.reduceat(ok, firsts),
    }).cast(SESSION_SCHEMA)


def covered(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The time covered by at least one of the intervals, as (starts, ends) of disjoint intervals in order."""
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, reach = starts[order], np.maximum.accumulate(ends[order])
    firsts = np.flatnonzero(np.concatenate([[True], starts[1:] > reach[:-1]]))
    lasts = np.append(firsts[1:] - 1, len(starts) - 1)
    return starts[firsts], reach[lasts]


def worker_stats(sessions: pa.Table) -> list[dict]:
    spans = sessions.append_column("span_s", pc.subtract(sessions["end_s"], sessions["start_s"]))
    groups = spans.group_by(["worker_index", "device"]).aggregate([("span_s", "sum"), ("span_s", "count"),
                                                                    ("images", "sum")])
    workers = []
    for group in sorted(groups.to_pylist(), key=lambda g: (g["worker_index"] is None, g["worker_index"] or 0,
                                                           g["device"] or "")):
        workers.append({
            "worker_index": group["worker_index"],
            "device": group["device"],
            "images": group["images_sum"],
            "sessions": group["span_s_count"],
            "wall_s": group["span_s_sum"],
            "images_per_s": rate(group["images_sum"], group["span_s_sum"]),
        })
    return workers


def gpu_use(table: pa.Table, gpu_hour_cost: float | None) -> dict:
    """GPU-busy seconds and what they made: the device stages' shares summed over every image rendered on a GPU
    (failed ones too, their time was spent), the ok images among them, and the ok images made on other devices
    (counted apart)."""
    on_gpu = pc.fill_null(pc.starts_with(table["device"], "cuda"), False)
    gpu_rows = table.filter(on_gpu)
    seconds = sum(pc.sum(gpu_rows[name]).as_py() or 0.0 for name in DEVICE_STAGES)
    ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
    images = pc.sum(pc.and_(ok, on_gpu)).as_py() or 0
    elsewhere = value_counts(pc.fill_null(table.filter(pc.and_(ok, pc.invert(on_gpu)))["device"], "unknown device"))
    return {
        "seconds": seconds, "images": images, "elsewhere": elsewhere, "gpu_hour_cost": gpu_hour_cost,
        "figures": gpu_hour_figures(images, seconds, gpu_hour_cost),
        "lines": cost_lines(images, seconds, gpu_hour_cost),
    }


def summarize(table: pa.Table, gpu_hour_cost: float | None = None, saved: dict | None = None) -> dict:
    statuses = dict(value_counts(table["status"]))
    sessions = session_table(timed_images(table))
    starts, ends = covered(sessions["start_s"].to_numpy(), sessions["end_s"].to_numpy())
    wall_s = float(np.sum(ends - starts)) if len(starts) else None
    return {
        "images": len(table),
        "ok": statuses.get("ok", 0),
        "skipped": statuses.get("skipped", 0),
        "failed": statuses.get("failed", 0),
        "truncated": pc.sum(pc.fill_null(table["truncated"], False)).as_py() or 0,
        "failed_reasons": reasons(table, "failed"),
        "skipped_reasons": reasons(table, "skipped"),
        "wall_s": wall_s,  # the sessions' spans (see SESSION_GAP_S), not the first image to the last
        "images_per_s": rate(pc.sum(sessions["images"]).as_py() or 0, wall_s),
        "sessions": len(sessions),
        "runs": len(starts),  # stretches of time with at least one worker rendering
        "spans": (starts, ends),
        "workers": worker_stats(sessions),
        "stage_s": {name: pc.sum(table[name]).as_py() or 0.0 for name in STAGE_COLUMNS},
        "gpu": gpu_use(table, gpu_hour_cost),
        "settings": run_settings(table, saved or {}),
    }


def reasons(table: pa.Table, status: str) -> list[tuple[str, int]]:
    rows = table.filter(pc.equal(table["status"], status))
    counts = Counter(dict(value_counts(rows["reason"])))
    if missing := len(rows) - sum(counts.values()):
        counts["(no reason given)"] = missing
    return counts.most_common()


# ---- run settings ----

# (row of the settings table, ledger column); size joins width and height. lora/lora_scale are in newer ledgers.
LEDGER_SETTINGS = [("model", "model"), ("scheduler", "scheduler"), ("steps", "steps"),
                   ("guidance scale", "guidance_scale"), ("attention", "attention_backend"),
                   ("batch size", "batch_size"), ("device", "device"), ("LoRA", "lora"), ("LoRA scale", "lora_scale")]
SETTING_ORDER = ["model", "weights", "scheduler", "steps", "size", "guidance scale", "dtype", "attention",
                 "batch size", "device", "LoRA", "LoRA scale", "image format"]
MAX_SETTING_VALUES = 6  # per row of the settings table; the rest is counted


def read_folder_settings(output_dir: Path) -> tuple[dict, str | None]:
    """The run-level settings DIR/sdbatch.json records ({} without one), and why it could not be read."""
    path = output_dir / SETTINGS_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return {}, f"{SETTINGS_FILE} could not be read ({err}); the settings table shows the ledgers' values only"
    return (saved if isinstance(saved, dict) else {}), None


def as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as the settings table shows it: lists joined with ', ', nulls and empty values as 'none'."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.binary_join(column.cast(pa.list_(pa.string())), ", ")
    text = pc.cast(column, pa.string())
    return pc.if_else(pc.fill_null(pc.equal(text, ""), True), "none", text)


def text_counts(text: pa.ChunkedArray) -> list[tuple[str, int]]:
    return sorted(value_counts(text), key=lambda pair: (-pair[1], pair[0]))


def folder_settings(saved: dict) -> dict:
    """Settings rows from sdbatch.json (the folder's latest run; no image counts): weights, dtype, image format."""
    if not saved:
        return {}
    extras = saved.get("extras") or {}
    image_format = extras.get("image_format") or {}
    found = {
        "weights": [(str(saved.get("weights") or saved.get("model") or "unknown"), None)],
        # Content keys record dtype only where it is not fp16, what the first sdbatch always used.
        "dtype": [(str(extras.get("dtype", "fp16")), None)],
        "image format": [(str(image_format.get("name", "png") if isinstance(image_format, dict) else image_format),
                          None)],
    }
    for name, key in (("LoRA", "lora"), ("LoRA scale", "lora_scale")):
        value = saved.get(key, extras.get(key))
        if value not in (None, "", []):
            found[name] = [(", ".join(map(str, value)) if isinstance(value, list) else str(value), None)]
    return found


def run_settings(table: pa.Table, saved: dict) -> list[tuple[str, list[tuple[str, int | None]]]]:
    """(setting, [(value, images)]) for the settings table: the values of the ok images in the ledger, most common
    first, else the folder's run-level value (images None)."""
    rendered = table.filter(pc.fill_null(pc.equal(table["status"], "ok"), False))
    found = folder_settings(saved)
    for name, column in LEDGER_SETTINGS:
        if column in rendered.column_names and len(rendered):
            if column.startswith("lora") and rendered[column].null_count == len(rendered):
                continue  # a folder that never used a LoRA says nothing about LoRAs
            found[name] = text_counts(as_text(rendered[column]))
    if {"width", "height"} <= set(rendered.column_names) and len(rendered):
        size = pc.binary_join_element_wise(as_text(rendered["width"]), as_text(rendered["height"]), "×")
        found["size"] = text_counts(size)
    return [(name, found[name]) for name in SETTING_ORDER if name in found]


# ---- charts ----

def new_chart(title: str) -> tuple[Figure, "matplotlib.axes.Axes"]:
    figure = Figure(figsize=(5.6, 3.0), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, loc="left", fontsize=10.5, fontweight="bold", color="#1f2630")
    axes.spines[["top", "right"]].set_visible(False)
    axes.set_axisbelow(True)
    return figure, axes


def to_svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata=dict.fromkeys(["Format", "Type", "Creator", "Date"]))  # no RDF block
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog so it can sit inside HTML


def no_data(axes, text: str = "no data yet") -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="#8a919c")
    axes.set_xticks([])
    axes.set_yticks([])


def rendering_time(seconds: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Epoch seconds as seconds into the covered spans laid end to end: the idle time between them cut out."""
    offsets = np.concatenate([[0.0], np.cumsum(ends - starts)[:-1]])
    span = np.clip(np.searchsorted(starts, seconds, side="right") - 1, 0, None)
    return offsets[span] + seconds - starts[span]


def time_axis(axes, starts: np.ndarray, ends: np.ndarray):
    """Label the x axis and return the function placing epoch seconds on it: UTC time for one span, else rendering
    time with the idle gaps between spans cut out (and marked), so a folder rendered over several nights reads as
    one line."""
    if len(starts) <= 1:
        locator = AutoDateLocator()
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        axes.set_xlabel("finished at (UTC)")
        return lambda seconds: (seconds * 1e6).astype("datetime64[us]")
    total = float(np.sum(ends - starts))
    unit, per = ("h", 3600) if total > 3 * 3600 else ("min", 60) if total > 180 else ("s", 1)
    for cut in np.cumsum(ends - starts)[:-1]:
        axes.axvline(cut / per, color="#8a919c", linestyle=":", linewidth=1)
    axes.set_xlabel(f"rendering time ({unit}); dotted: {len(starts) - 1} idle gap(s) between sessions cut out")
    return lambda seconds: rendering_time(seconds, starts, ends) / per


def matches(column: pa.ChunkedArray, value) -> pa.ChunkedArray:
    return pc.is_null(column) if value is None else pc.fill_null(pc.equal(column, value), False)


def throughput_chart(timed: pa.Table, summary: dict) -> str:
    figure, axes = new_chart("Throughput: images finished per worker")
    done = timed.filter(pc.equal(timed["status"], "ok"))
    if not len(done):
        no_data(axes)
        return to_svg(figure)
    place = time_axis(axes, *summary["spans"])
    for worker in summary["workers"]:
        mine = done.filter(pc.and_(matches(done["worker_index"], worker["worker_index"]),
                                   matches(done["device"], worker["device"])))
        if not len(mine):
            continue
        finished = np.sort(mine["finished_s"].to_numpy())
        keep = np.unique(np.linspace(0, len(finished) - 1, MAX_LINE_POINTS).round().astype(int))
        seconds = np.concatenate([[np.min(mine["started_s"])], finished[keep]])
        counts = np.concatenate([[0], keep + 1])
        axes.step(place(seconds), counts, where="post", linewidth=1.6, label=worker_label(worker))
    axes.set_ylabel("images (cumulative)")
    axes.legend(frameon=False, fontsize=8)
    return to_svg(figure)


def stage_chart(stage_s: dict) -> str:
    figure, axes = new_chart("Time per stage (all images)")
    total = sum(stage_s.values())
    if not total:
        no_data(axes)
        return to_svg(figure)
    names = list(stage_s)[::-1]  # barh draws bottom-up; keep pipeline order top-down
    values = [stage_s[name] for name in names]
    bars = axes.barh([name.removesuffix("_s").replace("_", " ") for name in names], values, color="#3b6fd4")
    axes.bar_label(bars, [f"{format_duration(v)} ({v / total:.0%})" for v in values], padding=3, fontsize=8)
    axes.set_xlabel("seconds")
    axes.margins(x=0.25)
    axes.grid(axis="y", visible=False)
    return to_svg(figure)


def count_chart(title: str, pairs: list[tuple], color: str) -> str:
    figure, axes = new_chart(title)
    if not pairs:
        no_data(axes)
        return to_svg(figure)
    labels = [str(value) for value, _ in pairs]
    bars = axes.bar(labels, [count for _, count in pairs], color=color, width=0.6)
    axes.bar_label(bars, padding=2, fontsize=8)
    axes.set_ylabel("images")
    axes.margins(y=0.15)
    axes.grid(axis="x", visible=False)
    return to_svg(figure)


def charts(table: pa.Table, summary: dict) -> list[str]:
    rendered = table.filter(pc.equal(table["status"], "ok"))
    breakdowns = [
        ("Ok images per UNet batch size", sorted(value_counts(rendered["batch_size"])), "#3a9e6a"),
        ("Ok images per attention backend", value_counts(rendered["attention_backend"]), "#8a63c9"),
    ]
    with matplotlib.rc_context(CHART_STYLE):
        svgs = [throughput_chart(timed_images(table), summary), stage_chart(summary["stage_s"])]
        # One value would be one bar: the settings table states it instead.
        return svgs + [count_chart(title, pairs, color) for title, pairs, color in breakdowns if len(pairs) >= 2]


# ---- contact sheet ----

def sorted_rows(table: pa.Table) -> pa.Table:
    return table.select(SHEET_COLUMNS).sort_by([("shard", "ascending"), ("id", "ascending"), ("image_index", "ascending")])


def even_sample(table: pa.Table, count: int) -> pa.Table:
    if count >= len(table):
        return table
    if count <= 0:
        return table.slice(0, 0)
    return table.take(np.unique(np.linspace(0, len(table) - 1, count).round().astype(int)))


def sheet_sections(table: pa.Table, max_thumbs: int) -> list[tuple[str, pa.Table, int]]:
    """(heading, rows shown, rows in total) per section: failed, other flagged, the rest."""
    failed = pc.equal(table["status"], "failed")
    flagged = flagged_mask(table)
    parts = [
        ("Failed", table.filter(failed)),
        ("Flagged: truncated prompt or a skip reason", table.filter(pc.and_(flagged, pc.invert(failed)))),
        ("Images", table.filter(pc.invert(flagged))),
    ]
    sections, budget = [], max_thumbs
    for heading, rows in parts:
        rows = sorted_rows(rows)
        # Failed and flagged rows fill the budget first; the rest is an even sample across shards.
        shown = rows.slice(0, budget) if heading != "Images" else even_sample(rows, budget)
        budget -= len(shown)
        if len(rows):
            sections.append((heading, shown, len(rows)))
    return sections


def thumbnail_uri(path: Path, size: int) -> str | None:
    """A JPEG data URI of the image scaled to fit size x size, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=82)
    except (OSError, ValueError):  # missing, still being written, or not an image
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumb_title(row: dict) -> str:
    lines = [row["prompt"] or "", f"seed {row['seed']} · {row['id']} #{row['image_index']}"]
    if row["status"] != "ok" or row["reason"]:
        lines.append(f"{row['status']}: {row['reason'] or 'no reason given'}")
    if row["truncated"]:
        lines.append("prompt truncated to the text encoder's window")
    return "\n".join(lines)


def thumb_caption(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason'] or '?'}"
    return "truncated" if row["truncated"] else (row["reason"] or "")


def short_id(text: str, limit: int) -> str:
    """text in at most limit characters, cut in the middle: ids often share a prefix and differ at the end."""
    if len(text) <= limit:
        return text
    tail = (limit - 1) // 2
    return f"{text[:limit - 1 - tail]}…{text[len(text) - tail:]}"


def caption_html(row: dict, size: int) -> str:
    """The row's id (whole on hover) and, for a failed or flagged image, why."""
    suffix = f" #{row['image_index']}" if row["image_index"] else ""
    full = f"{row['id']}{suffix}"
    shown = short_id(str(row["id"]), max(8, size // 7 - len(suffix))) + suffix  # about 7 px a character
    lines = [f'<span class="id" title="{html.escape(full)}">{html.escape(shown)}</span>']
    if status := thumb_caption(row):
        lines.append(f'<span title="{html.escape(status)}">{html.escape(status)}</span>')
    return f"<figcaption>{''.join(lines)}</figcaption>"


def thumb_html(row: dict, uri: str | None, size: int) -> str:
    if uri:
        picture = f'<img src="{uri}" alt="{html.escape(str(row["id"]))}">'
    else:
        picture = f'<span class="placeholder">{"missing" if row["image_path"] else html.escape(row["status"])}</span>'
    title = html.escape(thumb_title(row))
    if row["image_path"]:
        picture = f'<a href="../{html.escape(quote(row["image_path"]))}" title="{title}">{picture}</a>'
    else:
        picture = f'<span class="nolink" title="{title}">{picture}</span>'
    return (f'<figure class="thumb {html.escape(row["status"])}" style="width:{size}px">'
            f'<div class="frame" style="height:{size}px">{picture}</div>{caption_html(row, size)}</figure>')


def section_html(heading: str, shown: pa.Table, total: int, output_dir: Path, size: int) -> str:
    rows = shown.to_pylist()
    paths = [output_dir / row["image_path"] if row["image_path"] else None for row in rows]
    with ThreadPoolExecutor() as pool:  # Pillow decodes with the GIL released
        uris = list(pool.map(lambda path: thumbnail_uri(path, size) if path else None, paths))
    count = f"{total}" if len(rows) == total else f"{len(rows)} of {total}"
    parts = [f'<h3>{html.escape(heading)} <span class="muted">({count})</span></h3><div class="shards">']
    shard = None
    for row, uri in zip(rows, uris):
        if row["shard"] != shard:
            if shard is not None:
                parts.append("</div></div>")
            shard = row["shard"]
            parts.append(f'<div class="shard"><h4>shard {shard}</h4><div class="grid">')
        parts.append(thumb_html(row, uri, size))
    parts.append("</div></div></div>" if shard is not None else "</div>")
    return "\n".join(parts)


def sheet_html(table: pa.Table, output_dir: Path, size: int, max_thumbs: int) -> tuple[str, int]:
    sections = sheet_sections(table, max_thumbs)
    shown = sum(len(rows) for _, rows, _ in sections)
    note = ""
    if shown < len(table):
        note = (f'<p class="note">Showing {shown} of {len(table)} images (max_thumbs={max_thumbs}): '
                "failed and flagged images first, then an even sample of the others.</p>")
    body = "\n".join(section_html(heading, rows, total, output_dir, size) for heading, rows, total in sections)
    return note + body, shown


# ---- page ----

def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def format_rate(per_s: float | None) -> str:
    return "–" if per_s is None else f"{per_s:.3g}"


def worker_label(worker: dict) -> str:
    return f"worker {worker['worker_index']}" + (f" · {worker['device']}" if worker["device"] else "")


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def cards_html(summary: dict) -> str:
    cards = [
        ("images", summary["images"], ""), ("ok", summary["ok"], "ok"), ("skipped", summary["skipped"], "skipped"),
        ("failed", summary["failed"], "failed"), ("truncated", summary["truncated"], ""),
        ("wall time", format_duration(summary["wall_s"]), ""), ("images/s", format_rate(summary["images_per_s"]), ""),
    ]
    gpu, figures = summary["gpu"], summary["gpu"]["figures"]
    if figures:
        cards.append(("images / GPU-hour", amount(figures["images_per_gpu_hour"]), ""))
    else:
        cards.append(("images / GPU-hour", "on CPU" if gpu["elsewhere"] else "–", ""))
    if gpu["gpu_hour_cost"] is not None:
        cost = figures and figures["cost_per_1000"]
        cards.append(("per 1,000 images", "–" if cost is None else amount(cost), ""))
    return "\n".join(
        f'<div class="card {kind}" data-key="{html.escape(label)}"><div class="value">{html.escape(str(value))}</div>'
        f'<div class="label">{html.escape(label)}</div></div>'
        for label, value, kind in cards
    )


def timing_note(summary: dict) -> str:
    if not summary["sessions"]:
        return ""
    return (f'<p class="muted">Wall time and images/s count the time at least one worker was rendering '
            f'({plural(summary["runs"], "run")}, {plural(summary["sessions"], "worker session")}), not the first image '
            "to the last: a worker's session is its batches back to back, and an idle gap longer than "
            f"{SESSION_GAP_S:g} s and {SESSION_GAP_BATCHES} times its last batch (another run, another night) starts "
            "a new one.</p>")


def values_html(values: list[tuple[str, int | None]]) -> str:
    """One value as it is; several each with its image count, the most common first."""
    if len(values) == 1:
        return html.escape(values[0][0])
    shown = [f'{html.escape(value)} <span class="muted">({count:,})</span>'
             for value, count in values[:MAX_SETTING_VALUES]]
    if len(values) > MAX_SETTING_VALUES:
        shown.append(f'<span class="muted">and {len(values) - MAX_SETTING_VALUES} more</span>')
    return " · ".join(shown)


def settings_html(summary: dict) -> str:
    if not summary["settings"]:
        return '<p class="muted">No rendered images yet.</p>'
    body = "".join(f'<tr><th>{html.escape(name)}</th><td class="value">{values_html(values)}</td></tr>'
                   for name, values in summary["settings"])
    return (f'<table class="settings">{body}</table><p class="muted">The rendered images\' values in the ledgers, '
            "with image counts where there are several; weights, dtype and image format are the folder's run-level "
            f"settings ({SETTINGS_FILE}, as of its latest run).</p>")


def cost_html(summary: dict) -> str:
    gpu, figures = summary["gpu"], summary["gpu"]["figures"]
    elsewhere = ", ".join(f"{count:,} on {device}" for device, count in gpu["elsewhere"])
    if figures is None:
        what = f" ({elsewhere})" if elsewhere else ""
        return f'<p class="muted">No image was rendered on a GPU{html.escape(what)}: no GPU-hour figures.</p>'
    price = gpu["gpu_hour_cost"]
    if price is None:
        cost = "gpu_hour_cost=PRICE gives it"
    elif figures["cost_per_1000"] is None:
        cost = "–"  # no ok image to share the cost
    else:
        cost = f"{amount(figures['cost_per_1000'])} at {price:g} per GPU-hour"
    rows = [("images per GPU-hour", amount(figures["images_per_gpu_hour"])), ("cost of 1,000 images", cost),
            ("GPU-busy time", f"{format_duration(gpu['seconds'])} ({figures['gpu_hours']:.3g} GPU-hours)"),
            ("ok images made on a GPU", f"{gpu['images']:,}")]
    body = "".join(f'<tr><th>{name}</th><td class="num">{html.escape(value)}</td></tr>' for name, value in rows)
    not_counted = f" Images made elsewhere are not counted: {elsewhere}." if elsewhere else ""
    return (f'<table class="settings">{body}</table><p class="muted">GPU-busy time is each image\'s share of its '
            "batch's text encode, denoise and VAE decode, summed over every image rendered on a GPU (failed ones "
            "too: their time was spent). Image writes, model loading and idle time are not in it, so a bill by the "
            f"hour is higher.{html.escape(not_counted)}</p>")


def reasons_html(summary: dict) -> str:
    rows = [(status, reason, count) for status in ("failed", "skipped")
            for reason, count in summary[f"{status}_reasons"]]
    if not rows:
        return '<p class="muted">No failed or skipped images.</p>'
    body = "".join(f'<tr><td><span class="pill {status}">{status}</span></td><td>{html.escape(str(reason))}</td>'
                   f'<td class="num">{count}</td></tr>' for status, reason, count in rows)
    return f'<table><tr><th>status</th><th>reason</th><th class="num">images</th></tr>{body}</table>'


def workers_html(summary: dict) -> str:
    if not summary["workers"]:
        return '<p class="muted">No finished images yet.</p>'
    body = "".join(
        f'<tr><td>{worker["worker_index"]}</td><td>{html.escape(worker["device"] or "")}</td>'
        f'<td class="num">{worker["images"]}</td><td class="num">{worker["sessions"]}</td>'
        f'<td class="num">{format_duration(worker["wall_s"])}</td>'
        f'<td class="num">{format_rate(worker["images_per_s"])}</td></tr>'
        for worker in summary["workers"]
    )
    return ('<table><tr><th>worker</th><th>device</th><th class="num">ok images</th><th class="num">sessions</th>'
            f'<th class="num">wall time</th><th class="num">images/s</th></tr>{body}</table>')


def warnings_html(summary: dict) -> str:
    parts = []
    if summary["unreadable"]:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in summary["unreadable"])
        parts.append(f'<div class="warning">Skipped ledgers that could not be read (a run may be replacing them):'
                     f"<ul>{items}</ul></div>")
    if summary["settings_problem"]:
        parts.append(f'<div class="warning">{html.escape(summary["settings_problem"])}</div>')
    return "\n".join(parts)


PAGE_CSS = """
:root { --ink:#1f2630; --muted:#6b7380; --line:#e3e6eb; --bg:#f5f6f8; --ok:#2f8f5b; --skipped:#b7791f; --failed:#c53b4f; }
* { box-sizing: border-box; }
body { margin:0; padding:28px 36px 60px; background:var(--bg); color:var(--ink);
       font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans",sans-serif; }
h1 { font-size:22px; margin:0 0 2px; } h2 { font-size:17px; margin:30px 0 12px; }
h3 { font-size:15px; margin:22px 0 8px; } h4 { font-size:12px; margin:12px 0 6px; color:var(--muted);
     text-transform:uppercase; letter-spacing:.05em; }
.muted { color:var(--muted); font-weight:normal; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(130px,1fr)); gap:12px; margin-top:18px; }
.card, .panel { background:#fff; border:1px solid var(--line); border-radius:10px; box-shadow:0 1px 2px rgba(0,0,0,.04); }
.card { padding:14px 16px; } .card .value { font-size:24px; font-weight:650; } .card .label { color:var(--muted); }
.card.ok .value { color:var(--ok); } .card.skipped .value { color:var(--skipped); } .card.failed .value { color:var(--failed); }
.tables { display:grid; grid-template-columns:repeat(auto-fit,minmax(380px,1fr)); gap:16px; }
.panel { padding:14px 18px; } .panel h3 { margin-top:0; }
table.settings th { width:38%; } td.value { overflow-wrap:anywhere; }
table { border-collapse:collapse; width:100%; } th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); }
th { color:var(--muted); font-weight:600; font-size:12px; } .num { text-align:right; font-variant-numeric:tabular-nums; }
.pill { border-radius:999px; padding:1px 8px; font-size:12px; color:#fff; }
.pill.failed { background:var(--failed); } .pill.skipped { background:var(--skipped); }
.charts { display:grid; grid-template-columns:repeat(auto-fit,minmax(460px,1fr)); gap:16px; }
.chart { padding:10px; } .chart svg { width:100%; height:auto; display:block; }
.shards { display:flex; flex-wrap:wrap; gap:4px 32px; } .shard { max-width:100%; }
.grid { display:flex; flex-wrap:wrap; gap:8px; }
.thumb { margin:0; } .frame { display:flex; align-items:center; justify-content:center; background:#fff;
         border:1px solid var(--line); border-radius:6px; overflow:hidden; }
.thumb.failed .frame { border:2px solid var(--failed); } .thumb.skipped .frame { border:2px solid var(--skipped); }
.frame img { display:block; max-width:100%; max-height:100%; } .frame a, .frame .nolink { display:contents; }
.placeholder { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.05em; }
figcaption span { display:block; font-size:11px; color:var(--muted); white-space:nowrap; overflow:hidden;
                  text-overflow:ellipsis; }
figcaption .id { color:var(--ink); font-variant-numeric:tabular-nums; }
.note, .warning { background:#fff8e6; border:1px solid #f0d9a0; border-radius:8px; padding:8px 12px; }
.warning ul { margin:4px 0 0; }
"""

# Lets a headless browser (and the tests) see how many thumbnails decoded and how many charts are on the page.
PAGE_SCRIPT = """
window.addEventListener("load", () => {
  const loaded = Array.from(document.images).filter(img => img.complete && img.naturalWidth > 0);
  document.body.dataset.imagesLoaded = loaded.length;
  document.body.dataset.charts = document.querySelectorAll(".chart svg").length;
});
"""


def page_html(output_dir: Path, summary: dict, chart_svgs: list[str], sheet: str) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    source = f"{summary['ledgers'] - len(summary['unreadable'])} of {summary['ledgers']} ledgers"
    charts_block = "\n".join(f'<div class="panel chart">{svg}</div>' for svg in chart_svgs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdbatch report · {html.escape(output_dir.name)}</title><style>{PAGE_CSS}</style></head>
<body>
<h1>sdbatch report</h1>
<div class="muted">{html.escape(str(output_dir))} · {source} · generated {generated}</div>
{warnings_html(summary)}
<div class="cards">{cards_html(summary)}</div>
{timing_note(summary)}
<h2>Run settings and cost</h2>
<div class="tables"><div class="panel"><h3>Settings</h3>{settings_html(summary)}</div>
<div class="panel"><h3>GPU time and cost</h3>{cost_html(summary)}</div></div>
<h2>Workers and failures</h2>
<div class="tables"><div class="panel"><h3>Per worker</h3>{workers_html(summary)}</div>
<div class="panel"><h3>Failed and skipped</h3>{reasons_html(summary)}</div></div>
<h2>Charts</h2>
<div class="charts">{charts_block}</div>
<h2>Contact sheet</h2>
<p class="muted">The row id is under each image; hover for prompt and seed; click for the full image.</p>
{sheet}
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def write_atomically(path: Path, write) -> None:
    """Write via a dot-named temp file and rename, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    os.replace(temp, path)


def build_report(output_dir, merged: bool = False, thumb_size: int = 128, max_thumbs: int = 2000,
                 gpu_hour_cost: float | None = None) -> dict:
    """Write output_dir/report/index.html (and merged.parquet if asked); return the summary."""
    output_dir = Path(output_dir)
    table, ledger_count, unreadable = read_ledgers(output_dir)
    saved, settings_problem = read_folder_settings(output_dir)
    summary = summarize(table, gpu_hour_cost, saved) | {"ledgers": ledger_count, "unreadable": unreadable,
                                                         "settings_problem": settings_problem}
    sheet, summary["thumbnails"] = sheet_html(table, output_dir, thumb_size, max_thumbs)
    report_dir = output_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    page = page_html(output_dir.resolve(), summary, charts(table, summary), sheet)
    summary["page"] = report_dir / "index.html"
    write_atomically(summary["page"], lambda path: path.write_text(page, encoding="utf-8"))
    summary["merged"] = report_dir / "merged.parquet" if merged else None
    if merged:
        write_atomically(summary["merged"], lambda path: pq.write_table(table, path))
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['images']} images: {summary['ok']} ok, {summary['skipped']} skipped, "
             f"{summary['failed']} failed, {summary['truncated']} with truncated prompts"]
    for status in ("failed", "skipped"):
        top = summary[f"{status}_reasons"][:3]
        if top:
            lines.append(f"  top {status} reasons: " + "; ".join(f"{count}× {reason}" for reason, count in top))
    lines.append(f"wall time {format_duration(summary['wall_s'])} over {plural(summary['runs'], 'run')}, "
                 f"{format_rate(summary['images_per_s'])} images/s")
    for worker in summary["workers"]:
        lines.append(f"  {worker_label(worker)}: {worker['images']} images, {format_rate(worker['images_per_s'])} "
                     f"images/s over {format_duration(worker['wall_s'])} in {plural(worker['sessions'], 'session')}")
    gpu = summary["gpu"]
    lines += gpu["lines"]
    if gpu["elsewhere"]:
        lines.append("  not counted as GPU time: " + ", ".join(f"{count:,} ok images on {device}"
                                                               for device, count in gpu["elsewhere"]))
    if summary["settings_problem"]:
        lines.append(summary["settings_problem"])
    for line in summary["unreadable"]:
        lines.append(f"skipped unreadable ledger {line}")
    lines.append(f"report: {summary['page']}")
    if summary["merged"]:
        lines.append(f"merged ledger: {summary['merged']}")
    return "\n".join(lines)


def report_from_config(cfg) -> dict:
    try:
        output_dir = cfg.output_dir
    except MissingMandatoryValue:
        raise SdbatchError("Say which run to report on: python -m sdbatch.report output_dir=DIR.") from None
    return build_report(output_dir, merged=cfg.merged, thumb_size=cfg.thumb_size, max_thumbs=cfg.max_thumbs,
                        gpu_hour_cost=cfg.gpu_hour_cost)


@hydra.main(config_path="conf", config_name="report", version_base="1.3")
def report_job(cfg) -> None:
    try:
        settings.check_report(cfg)
        summary = report_from_config(cfg)
    except SdbatchError as err:
        print(f"sdbatch: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(summary))


def main() -> None:
    cli.start("report", settings.report_problems)  # --help, and every mistake in the command line, before Hydra
    report_job()


if __name__ == "__main__":
    main()
