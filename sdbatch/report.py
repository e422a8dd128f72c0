"""python -m sdbatch.report output_dir=DIR: a self-contained HTML report built from a run's ledgers.

Reads every DIR/ledger/*.parquet (also while a run is still writing them), writes DIR/report/index.html
(summary, charts as inline SVG, a contact sheet of inline thumbnails linking to the full images),
optionally DIR/report/merged.parquet, and prints a short summary.
"""

import base64
import html
import io
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
        return pa.concat_tables(tables, promote_options="permissive"), len(paths), unreadable
    except pa.ArrowException as err:
        raise SdbatchError(f"The ledgers in {output_dir / 'ledger'} do not fit together into one table: {err}.")


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
    """Ok images with a finish time, with started_s/finished_s columns added."""
    timed = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["finished_at"])))
    started, finished = image_times(timed)
    return timed.append_column("started_s", pa.array(started)).append_column("finished_s", pa.array(finished))


def rate(images: int, seconds: float | None) -> float | None:
    return images / seconds if seconds else None


def worker_stats(timed: pa.Table) -> list[dict]:
    groups = timed.group_by(["worker_index", "device"]).aggregate(
        [("started_s", "min"), ("finished_s", "max"), ("status", "count")]
    )
    workers = []
    for group in sorted(groups.to_pylist(), key=lambda g: (g["worker_index"], g["device"] or "")):
        wall_s = group["finished_s_max"] - group["started_s_min"]
        workers.append({
            "worker_index": group["worker_index"],
            "device": group["device"],
            "images": group["status_count"],
            "wall_s": wall_s,
            "images_per_s": rate(group["status_count"], wall_s),
        })
    return workers


def summarize(table: pa.Table) -> dict:
    statuses = dict(value_counts(table["status"]))
    timed = timed_images(table)
    wall_s = float(np.max(timed["finished_s"]) - np.min(timed["started_s"])) if len(timed) else None
    return {
        "images": len(table),
        "ok": statuses.get("ok", 0),
        "skipped": statuses.get("skipped", 0),
        "failed": statuses.get("failed", 0),
        "truncated": pc.sum(pc.fill_null(table["truncated"], False)).as_py() or 0,
        "failed_reasons": reasons(table, "failed"),
        "skipped_reasons": reasons(table, "skipped"),
        # From the estimated start of the first batch to the last finished image (gaps between runs included).
        "wall_s": wall_s,
        "images_per_s": rate(len(timed), wall_s),
        "workers": worker_stats(timed),
        "stage_s": {name: pc.sum(table[name]).as_py() or 0.0 for name in STAGE_COLUMNS},
    }


def reasons(table: pa.Table, status: str) -> list[tuple[str, int]]:
    rows = table.filter(pc.equal(table["status"], status))
    counts = Counter(dict(value_counts(rows["reason"])))
    if missing := len(rows) - sum(counts.values()):
        counts["(no reason given)"] = missing
    return counts.most_common()


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


def throughput_chart(timed: pa.Table) -> str:
    figure, axes = new_chart("Throughput: images finished per worker")
    for worker in worker_stats(timed):
        mine = timed.filter(pc.equal(timed["worker_index"], worker["worker_index"]))
        if worker["device"] is not None:
            mine = mine.filter(pc.equal(mine["device"], worker["device"]))
        finished = np.sort(mine["finished_s"].to_numpy())
        keep = np.unique(np.linspace(0, len(finished) - 1, MAX_LINE_POINTS).round().astype(int))
        seconds = np.concatenate([[np.min(mine["started_s"])], finished[keep]])
        counts = np.concatenate([[0], keep + 1])
        times = (seconds * 1e6).astype("datetime64[us]")
        axes.step(times, counts, where="post", linewidth=1.6, label=worker_label(worker))
    if len(timed):
        locator = AutoDateLocator()
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        axes.set_ylabel("images (cumulative)")
        axes.set_xlabel("finished at (UTC)")
        axes.legend(frameon=False, fontsize=8)
    else:
        no_data(axes)
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
    batch_sizes = sorted(value_counts(rendered["batch_size"]))
    backends = value_counts(rendered["attention_backend"])
    with matplotlib.rc_context(CHART_STYLE):
        return [
            throughput_chart(timed_images(table)),
            stage_chart(summary["stage_s"]),
            count_chart("Ok images per UNet batch size", batch_sizes, "#3a9e6a"),
            count_chart("Ok images per attention backend", backends, "#8a63c9"),
        ]


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
    caption = thumb_caption(row)
    caption_html = f'<figcaption title="{html.escape(caption)}">{html.escape(caption)}</figcaption>' if caption else ""
    return (f'<figure class="thumb {html.escape(row["status"])}" style="width:{size}px">'
            f'<div class="frame" style="height:{size}px">{picture}</div>{caption_html}</figure>')


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


def cards_html(summary: dict) -> str:
    cards = [
        ("images", summary["images"], ""), ("ok", summary["ok"], "ok"), ("skipped", summary["skipped"], "skipped"),
        ("failed", summary["failed"], "failed"), ("truncated", summary["truncated"], ""),
        ("wall time", format_duration(summary["wall_s"]), ""), ("images/s", format_rate(summary["images_per_s"]), ""),
    ]
    return "\n".join(
        f'<div class="card {kind}" data-key="{html.escape(label)}"><div class="value">{html.escape(str(value))}</div>'
        f'<div class="label">{html.escape(label)}</div></div>'
        for label, value, kind in cards
    )


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
        f'<td class="num">{worker["images"]}</td><td class="num">{format_duration(worker["wall_s"])}</td>'
        f'<td class="num">{format_rate(worker["images_per_s"])}</td></tr>'
        for worker in summary["workers"]
    )
    return ('<table><tr><th>worker</th><th>device</th><th class="num">ok images</th><th class="num">wall time</th>'
            f'<th class="num">images/s</th></tr>{body}</table>')


def warnings_html(summary: dict) -> str:
    if not summary["unreadable"]:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary["unreadable"])
    return f'<div class="warning">Skipped ledgers that could not be read (a run may be replacing them):<ul>{items}</ul></div>'


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
figcaption { font-size:11px; color:var(--muted); white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
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
<h2>Workers and failures</h2>
<div class="tables"><div class="panel"><h3>Per worker</h3>{workers_html(summary)}</div>
<div class="panel"><h3>Failed and skipped</h3>{reasons_html(summary)}</div></div>
<h2>Charts</h2>
<div class="charts">{charts_block}</div>
<h2>Contact sheet</h2>
<p class="muted">Hover for prompt and seed; click for the full image.</p>
{sheet}
<script>{PAGE_SCRIPT}</script>
</body></html>
"""


def write_atomically(path: Path, write) -> None:
    """Write via a dot-named temp file and rename, so a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    os.replace(temp, path)


def build_report(output_dir, merged: bool = False, thumb_size: int = 128, max_thumbs: int = 2000) -> dict:
    """Write output_dir/report/index.html (and merged.parquet if asked); return the summary."""
    output_dir = Path(output_dir)
    table, ledger_count, unreadable = read_ledgers(output_dir)
    summary = summarize(table) | {"ledgers": ledger_count, "unreadable": unreadable}
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
    lines.append(f"wall time {format_duration(summary['wall_s'])}, {format_rate(summary['images_per_s'])} images/s")
    for worker in summary["workers"]:
        lines.append(f"  {worker_label(worker)}: {worker['images']} images, "
                     f"{format_rate(worker['images_per_s'])} images/s")
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
    return build_report(output_dir, merged=cfg.merged, thumb_size=cfg.thumb_size, max_thumbs=cfg.max_thumbs)


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
