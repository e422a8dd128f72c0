"""The HTML report, from ledgers and PNGs made here (and, when the renderer is present, from a tiny-model run)."""

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdbatch.cost import cost_lines, gpu_hour_figures
from sdbatch.ledger import CORE_SCHEMA
from sdbatch.report import build_report

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SCRIPT_PROMPT = 'a cat <script>alert("x")</script> & "friends"'
RTL_PROMPT = "שלום עולם — café ☕ مرحبا"

LEDGER_SCHEMA = CORE_SCHEMA.append(pa.field("category", pa.string()))  # + a passthrough manifest column


def row(id, shard, worker, finished_s, status="ok", reason=None, prompt=None, truncated=False, image_index=0,
        write_image=True, device=None):
    """One ledger row; stage shares of 0.25 + 1.0 + 0.25 s in a batch of 2 plus a 0.5 s write = a 3.5 s batch."""
    rendered = status == "ok"
    return {
        "id": id, "image_index": image_index, "seed": 1000 + image_index, "prompt": prompt or f"prompt {id}",
        "negative_prompt": "", "width": 64, "height": 64, "steps": 2, "guidance_scale": 7.5,
        "content_key": f"key-{id}-{image_index}",
        "image_path": f"images/{shard:05d}/{id}-abc_{image_index}.png" if rendered else None,
        "status": status, "reason": reason, "truncated": truncated,
        "attention_backend": "sdpa" if worker == 0 else "vanilla", "attention_detail": "",
        "model": "tiny", "scheduler": "pndm", "shard": shard, "worker_index": worker, "num_workers": 2,
        "device": device or ("cpu" if worker == 0 else "cuda:0 (NVIDIA H200)"),
        "batch_size": 2 if rendered else None,
        "text_encode_s": 0.25 if rendered else None, "denoise_s": 1.0 if rendered else None,
        "vae_decode_s": 0.25 if rendered else None, "write_s": 0.5 if rendered else None,
        "finished_at": T0 + timedelta(seconds=finished_s) if rendered else None,
        "category": "animals",
        "_write_image": rendered and write_image,
    }


def sample_rows():
    return [
        row("r1", 0, 0, 10), row("r1", 0, 0, 10, image_index=1),
        row("r2", 0, 0, 20, prompt=SCRIPT_PROMPT), row("r3", 0, 0, 20, prompt=RTL_PROMPT, truncated=True),
        row("r4", 1, 1, 12), row("r5", 1, 1, 14, write_image=False),  # ledgered ok, but its PNG is gone
        row("r6", 1, 1, 0, status="failed", reason="CUDA out of memory"),
        row("r7", 2, 1, 0, status="failed", reason="CUDA out of memory"),
        row("r8", 2, 0, 0, status="skipped", reason="invalid width: -3"),
        row("r9", 2, 0, 16),
    ]


def write_run(output_dir: Path, rows: list[dict]) -> Path:
    for item in rows:
        if item.pop("_write_image"):
            path = output_dir / item["image_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (40 * item["shard"], 120, 200)).save(path)
    (output_dir / "ledger").mkdir(parents=True, exist_ok=True)
    for shard in sorted({item["shard"] for item in rows}):
        shard_rows = [item for item in rows if item["shard"] == shard]
        table = pa.Table.from_pylist(shard_rows, schema=LEDGER_SCHEMA)
        pq.write_table(table, output_dir / "ledger" / f"shard-{shard:05d}.parquet")
    return output_dir


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "out", sample_rows())


def run_cli(cwd: Path, *args):
    """`python -m sdbatch.report ARGS` in cwd (a test's own folder: never the user's working tree)."""
    return subprocess.run([sys.executable, "-m", "sdbatch.report", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_summary_counts_and_timing(run_dir):
    summary = build_report(run_dir)
    assert (summary["images"], summary["ok"], summary["skipped"], summary["failed"]) == (10, 7, 1, 2)
    assert summary["truncated"] == 1
    assert summary["failed_reasons"] == [("CUDA out of memory", 2)]
    assert summary["skipped_reasons"] == [("invalid width: -3", 1)]
    # First batch (finished at 10 s, 3.5 s long) started at 6.5 s; the last image finished at 20 s.
    assert summary["wall_s"] == pytest.approx(13.5)
    assert summary["images_per_s"] == pytest.approx(7 / 13.5)
    workers = {w["worker_index"]: w for w in summary["workers"]}
    assert workers[0]["images"] == 5 and workers[0]["wall_s"] == pytest.approx(13.5)
    assert workers[1]["images"] == 2 and workers[1]["wall_s"] == pytest.approx(14 - 8.5)
    assert workers[1]["device"] == "cuda:0 (NVIDIA H200)"
    assert summary["runs"] == 1 and summary["sessions"] == 2  # the two workers overlap: one run
    assert summary["stage_s"]["denoise_s"] == pytest.approx(7.0)
    assert summary["page"] == run_dir / "report" / "index.html" and summary["merged"] is None
    assert summary["thumbnails"] == 10 and summary["unreadable"] == []


def test_page_is_escaped_linked_and_ordered(run_dir):
    build_report(run_dir, thumb_size=96)
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")

    assert '<script>alert("x")' not in page
    assert "a cat &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;friends&quot;" in page
    assert RTL_PROMPT in page
    assert page.count("<svg") == 3  # throughput, stages, attention backends (batch size has one value: no chart)

    sheet = page[page.index("<h2>Contact sheet</h2>"):]
    thumbs = re.findall(r'<figure class="thumb (\w+)"', sheet)
    assert len(thumbs) == 10
    assert thumbs[:2] == ["failed", "failed"]  # failed first, then flagged (skipped, truncated), then the rest
    assert sheet.index(">failed: CUDA out of memory<") < sheet.index(">skipped: invalid width: -3<")
    assert sheet.index("#0\nprompt truncated") < sheet.index("prompt r1\nseed 1000")
    # 6 PNGs on disk become inline thumbnails; r5's missing PNG and the 3 unwritten rows become placeholders.
    assert sheet.count('<img src="data:image/jpeg;base64,') == 6
    assert sheet.count('<span class="placeholder">missing</span>') == 1
    assert sheet.count('<span class="placeholder">failed</span>') == 2
    links = re.findall(r'<a href="([^"]+)"', sheet)
    assert len(links) == 7 and "../images/00000/r1-abc_1.png" in links
    assert all((run_dir / "report" / link).resolve().is_file() for link in links if "r5-" not in link)
    assert 'title="prompt r6\nseed 1000 · r6 #0\nfailed: CUDA out of memory"' in sheet
    for shard in range(3):
        assert f"<h4>shard {shard}</h4>" in sheet
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_max_thumbs_shows_flagged_first_and_says_so(run_dir):
    summary = build_report(run_dir, max_thumbs=5)
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert summary["thumbnails"] == 5
    assert "Showing 5 of 10 images" in page
    sheet = page[page.index("<h2>Contact sheet</h2>"):]
    assert re.findall(r'<figure class="thumb (\w+)"', sheet)[:4] == ["failed", "failed", "ok", "skipped"]
    assert "(1 of 6)" in sheet  # 2 failed + 2 flagged leave room for one of the 6 others


def test_merged_parquet(run_dir):
    summary = build_report(run_dir, merged=True)
    merged = pq.read_table(run_dir / "report" / "merged.parquet")
    assert summary["merged"] == run_dir / "report" / "merged.parquet"
    assert merged.num_rows == 10
    assert merged.schema.equals(LEDGER_SCHEMA)
    assert sorted(set(merged["shard"].to_pylist())) == [0, 1, 2]
    assert not list((run_dir / "report").glob(".*"))  # temp files were renamed away


def test_unreadable_and_temp_ledgers_are_skipped(run_dir):
    (run_dir / "ledger" / "shard-00007.parquet").write_bytes(b"not parquet, or replaced mid-read")
    (run_dir / "ledger" / ".shard-00003.parquet").write_bytes(b"a writer's temp file")
    summary = build_report(run_dir)
    assert summary["ledgers"] == 4 and summary["images"] == 10
    assert len(summary["unreadable"]) == 1 and summary["unreadable"][0].startswith("shard-00007.parquet: ")
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "3 of 4 ledgers" in page and "shard-00007.parquet" in page


def test_shards_with_differing_passthrough_types_merge(tmp_path):
    rows = [row("a", 0, 0, 5), row("b", 1, 0, 6)]
    rows[0]["category"] = None
    out = write_run(tmp_path / "out", rows)
    # An all-null passthrough column reads back as null type in its own shard.
    pq.write_table(pq.read_table(out / "ledger" / "shard-00000.parquet").drop_columns("category")
                   .append_column("category", pa.nulls(1)), out / "ledger" / "shard-00000.parquet")
    summary = build_report(out, merged=True)
    assert summary["ok"] == 2
    assert pq.read_table(out / "report" / "merged.parquet")["category"].to_pylist() == [None, "animals"]


def test_cli_prints_summary(run_dir, tmp_path):
    result = run_cli(tmp_path, f"output_dir={run_dir}", "merged=true", "thumb_size=64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "10 images: 7 ok, 1 skipped, 2 failed, 1 with truncated prompts" in out
    assert "2× CUDA out of memory" in out and "1× invalid width: -3" in out
    assert "wall time 13.5s over 1 run, 0.519 images/s" in out
    assert "worker 0 · cpu: 5 images, 0.37 images/s over 13.5s in 1 session" in out
    assert "worker 1 · cuda:0 (NVIDIA H200): 2 images" in out
    assert "GPU: 2,400 images per GPU-hour (2 ok images in 0.000833 GPU-hours" in out
    assert "not counted as GPU time: 5 ok images on cpu" in out
    assert f"report: {run_dir / 'report' / 'index.html'}" in out
    assert (run_dir / "report" / "merged.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .hydra/ or outputs/ beside it


# ---- sessions: wall time and images/s over the runs' own spans ----

DAY = 24 * 3600


def timeline(worker, finishes, shard=0, device=None, prefix=None):
    """Ok rows of one worker finishing at these seconds after T0, each from a 3.5 s batch (see row)."""
    prefix = prefix or f"w{worker}-{finishes[0]:g}"
    return [row(f"{prefix}-{i}", shard, worker, finish, device=device) for i, finish in enumerate(finishes)]


def two_runs_a_day_apart():
    """Worker 0 (cpu) renders for 42 s, and again a day later for 60 s; worker 1 (a GPU) renders alongside the first
    run, from 6.5 s to 30 s. From the first image to the last that would be a day."""
    first = timeline(0, [3.5 * k for k in range(1, 13)])  # batches back to back: 0 .. 42 s
    second = timeline(0, [DAY + t for t in (3.5, 10, 20, 30, 40, 50, 60)], shard=1)  # 3 s gaps: DAY .. DAY + 60
    alongside = timeline(1, [10, 20, 30], shard=2)
    return first + second + alongside


def test_wall_time_is_the_runs_spans_not_first_to_last(tmp_path):
    summary = build_report(write_run(tmp_path / "out", two_runs_a_day_apart()))
    assert summary["ok"] == 22
    assert summary["wall_s"] == pytest.approx(42 + 60)  # worker 1's 23.5 s fall inside the first run
    assert summary["images_per_s"] == pytest.approx(22 / 102)
    assert (summary["runs"], summary["sessions"]) == (2, 3)
    workers = {w["worker_index"]: w for w in summary["workers"]}
    assert (workers[0]["images"], workers[0]["sessions"]) == (19, 2)
    assert workers[0]["wall_s"] == pytest.approx(102) and workers[0]["images_per_s"] == pytest.approx(19 / 102)
    assert (workers[1]["images"], workers[1]["sessions"]) == (3, 1)
    assert workers[1]["wall_s"] == pytest.approx(30 - 6.5)
    page = (tmp_path / "out" / "report" / "index.html").read_text(encoding="utf-8")
    assert "2 runs, 3 worker sessions" in page
    assert "1 idle gap(s) between sessions cut out" in page  # the throughput chart leaves out the day between


def test_concurrent_workers_do_not_fill_each_others_gaps(tmp_path):
    # Worker 0 stops at 20 s and comes back at 200 s; worker 1 renders throughout with short gaps. Worker 0's gap is
    # idle for it (two sessions) although the folder as a whole was busy (one run).
    rows = timeline(0, [3.5, 10, 20]) + timeline(0, [203.5, 210], shard=1) + timeline(1, range(10, 211, 10), shard=2)
    summary = build_report(write_run(tmp_path / "out", rows))
    workers = {w["worker_index"]: w for w in summary["workers"]}
    assert workers[0]["sessions"] == 2 and workers[0]["wall_s"] == pytest.approx(20 + 10)
    assert workers[1]["sessions"] == 1 and workers[1]["wall_s"] == pytest.approx(210 - 6.5)
    assert summary["runs"] == 1 and summary["wall_s"] == pytest.approx(210)


@pytest.mark.parametrize("gap, batch_s, sessions", [
    (29, 3.5, 1),   # under the 30 s floor
    (31, 3.5, 2),   # over it
    (45, 10, 1),    # slow batches: under 5 x 10 s
    (55, 10, 2),    # over it
])
def test_a_new_session_starts_after_an_idle_gap(tmp_path, gap, batch_s, sessions):
    # Two batches back to back from 0 s, then, `gap` seconds after the second one finished, two more.
    b = batch_s
    rows = timeline(0, [b, 2 * b]) + timeline(0, [2 * b + gap + b, 2 * b + gap + 2 * b], shard=1)
    for item in rows:
        item["denoise_s"] = (b - 0.5) / 2 - 0.5  # (0.25 + denoise + 0.25) x a batch of 2 + a 0.5 s write = b
    summary = build_report(write_run(tmp_path / "out", rows))
    assert summary["sessions"] == sessions
    assert summary["wall_s"] == pytest.approx(4 * b + (gap if sessions == 1 else 0))


def test_cli_reports_the_runs_spans(tmp_path):
    out = write_run(tmp_path / "out", two_runs_a_day_apart())
    result = run_cli(tmp_path, f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "wall time 1m 42s over 2 runs, 0.216 images/s" in result.stdout
    assert "worker 0 · cpu: 19 images, 0.186 images/s over 1m 42s in 2 sessions" in result.stdout


# ---- cost: images per GPU-hour and the cost of 1,000 images ----

def gpu_failure_rows():
    """sample_rows, where r6's failure came after its batch ran (a NaN image): its 1.5 s of GPU time count."""
    rows = sample_rows()
    r6 = next(item for item in rows if item["id"] == "r6")
    r6.update(batch_size=2, text_encode_s=0.25, denoise_s=1.0, vae_decode_s=0.25,
              finished_at=T0 + timedelta(seconds=13))
    return rows


def test_cost_figures(tmp_path):
    # GPU rows: r4 and r5 ok, r6 failed after its batch, r7 failed before (no stage times): 4.5 GPU-busy seconds for
    # 2 ok images. The 5 ok images on the CPU are not counted.
    summary = build_report(write_run(tmp_path / "out", gpu_failure_rows()), gpu_hour_cost=3)
    gpu = summary["gpu"]
    assert gpu["seconds"] == pytest.approx(4.5) and gpu["images"] == 2 and gpu["elsewhere"] == [("cpu", 5)]
    assert gpu["figures"]["gpu_hours"] == pytest.approx(4.5 / 3600)
    assert gpu["figures"]["images_per_gpu_hour"] == pytest.approx(1600)
    assert gpu["figures"]["cost_per_1000"] == pytest.approx(3 * 4.5 / 3600 / 2 * 1000)  # 1.875
    page = (tmp_path / "out" / "report" / "index.html").read_text(encoding="utf-8")
    assert '<div class="value">1,600</div><div class="label">images / GPU-hour</div>' in page
    assert '<div class="value">1.88</div><div class="label">per 1,000 images</div>' in page
    assert "1.88 at 3 per GPU-hour" in page
    assert "Images made elsewhere are not counted: 5 on cpu." in page
    assert "text encode, denoise and VAE decode" in page  # what is counted


def test_cost_without_a_price_gives_images_per_gpu_hour_only(run_dir):
    summary = build_report(run_dir)
    assert summary["gpu"]["figures"]["images_per_gpu_hour"] == pytest.approx(2400)
    assert summary["gpu"]["figures"]["cost_per_1000"] is None
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert '<div class="value">2,400</div><div class="label">images / GPU-hour</div>' in page
    assert "per 1,000 images</div>" not in page and "gpu_hour_cost=PRICE gives it" in page


def test_cost_on_cpu_only(tmp_path):
    summary = build_report(write_run(tmp_path / "out", timeline(0, [3.5, 7])), gpu_hour_cost=2.5)
    assert summary["gpu"]["figures"] is None and summary["gpu"]["lines"] == []
    page = (tmp_path / "out" / "report" / "index.html").read_text(encoding="utf-8")
    assert '<div class="value">on CPU</div><div class="label">images / GPU-hour</div>' in page
    assert "No image was rendered on a GPU (2 on cpu): no GPU-hour figures." in page


def test_cli_prints_the_cost(tmp_path):
    out = write_run(tmp_path / "out", gpu_failure_rows())
    result = run_cli(tmp_path, f"output_dir={out}", "gpu_hour_cost=3")
    assert result.returncode == 0, result.stderr
    assert ("GPU: 1,600 images per GPU-hour, 1.88 per 1,000 images at gpu_hour_cost=3 (2 ok images in 0.00125 "
            "GPU-hours of encode, denoise and decode)\n  not counted as GPU time: 5 ok images on cpu") in result.stdout


def test_cost_lines_for_the_worker_summary():
    # 50,000 images in 2.5 GPU-hours at 2.0 a GPU-hour: 20,000 images per GPU-hour, 0.10 per 1,000 images.
    assert cost_lines(50_000, 2.5 * 3600, 2.0) == [
        "GPU: 20,000 images per GPU-hour, 0.1 per 1,000 images at gpu_hour_cost=2 "
        "(50,000 ok images in 2.5 GPU-hours of encode, denoise and decode)"]
    assert cost_lines(900, 3600, None) == [
        "GPU: 900 images per GPU-hour (900 ok images in 1 GPU-hours of encode, denoise and decode); "
        "gpu_hour_cost= gives the cost per 1,000 images"]
    assert cost_lines(12, 0.0, 2.0) == []  # nothing ran on a GPU
    assert cost_lines(0, 36, 2.0)[0].startswith("GPU: 0 images per GPU-hour (0 ok images")
    assert gpu_hour_figures(3, 7.5, 1.2) == pytest.approx(
        {"gpu_hours": 7.5 / 3600, "images_per_gpu_hour": 1440, "cost_per_1000": 1.2 * 7.5 / 3600 / 3 * 1000})


def test_cost_module_needs_no_plotting_or_arrow():
    code = "import sys, sdbatch.cost; print(sorted({'matplotlib', 'pyarrow', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("value, problem", [
    ("-1", "gpu_hour_cost=-1 must be a price per GPU-hour"),
    ("nan", "gpu_hour_cost=nan must be a price per GPU-hour"),
    ("cheap", "gpu_hour_cost=cheap must be a price per GPU-hour"),
])
def test_cli_refuses_a_bad_gpu_hour_cost(run_dir, tmp_path, value, problem):
    result = run_cli(tmp_path, f"output_dir={run_dir}", f"gpu_hour_cost={value}")
    assert result.returncode == 2 and result.stdout == ""
    assert problem in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one paragraph
    assert not (run_dir / "report").exists()


# ---- run settings ----

def settings_table(page: str) -> dict:
    """{setting: value cell text} of the page's settings table."""
    table = page[page.index("<h3>Settings</h3>"):page.index("<h3>GPU time and cost</h3>")]
    cells = re.findall(r'<tr><th>([^<]*)</th><td class="value">(.*?)</td></tr>', table)
    return {name: re.sub(r"<[^>]+>", "", value) for name, value in cells}


def test_settings_table_from_the_ledger_and_sdbatch_json(tmp_path):
    rows = timeline(0, [3.5, 7, 10.5]) + timeline(0, [DAY + 3.5, DAY + 7], shard=1)
    for item in rows[3:]:  # the second night: another scheduler, with a LoRA
        item.update(scheduler="euler", lora="<b>style</b>-v2", lora_scale=0.8)
    out = write_run(tmp_path / "out", rows[:3])
    # The newer ledger has LoRAs; the older one's lora columns are all null (its images read as "none").
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "_write_image"} for r in rows[3:]],
                                        schema=LEDGER_SCHEMA),
                   out / "ledger" / "shard-00001.parquet")
    (out / "sdbatch.json").write_text(json.dumps({"num_shards": 2, "shard_size": 10, "settings": {
        "model": "random:tiny", "scheduler": "euler", "steps": 2, "extras": {"dtype": "fp32"}}}))
    summary = build_report(out)
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    table = settings_table(page)
    assert table == {
        "model": "tiny", "weights": "random:tiny", "scheduler": "pndm (3) · euler (2)", "steps": "2", "size": "64×64",
        "guidance scale": "7.5", "dtype": "fp32", "attention": "sdpa", "batch size": "2", "device": "cpu",
        "LoRA": "none (3) · &lt;b&gt;style&lt;/b&gt;-v2 (2)", "LoRA scale": "none (3) · 0.8 (2)",
        "image format": "png",
    }
    assert dict(summary["settings"])["scheduler"] == [("pndm", 3), ("euler", 2)]
    assert "<b>style</b>" not in page


def test_settings_table_without_lora_columns_or_sdbatch_json(run_dir):
    build_report(run_dir)
    table = settings_table((run_dir / "report" / "index.html").read_text(encoding="utf-8"))
    assert list(table) == ["model", "scheduler", "steps", "size", "guidance scale", "attention", "batch size", "device"]
    assert table["attention"] == "sdpa (5) · vanilla (2)" and table["batch size"] == "2"  # ok images only


def test_unreadable_sdbatch_json_is_a_warning(run_dir):
    (run_dir / "sdbatch.json").write_text("{half written")
    summary = build_report(run_dir)
    assert summary["ok"] == 7 and summary["settings_problem"].startswith("sdbatch.json could not be read")
    assert "sdbatch.json could not be read" in (run_dir / "report" / "index.html").read_text(encoding="utf-8")


# ---- charts and thumbnails ----

def test_a_breakdown_with_one_value_is_no_chart(tmp_path):
    rows = timeline(0, [3.5, 7, 10.5]) + timeline(1, [5, 9], shard=1, device="cpu")
    for item in rows:
        item["attention_backend"] = "sdpa"
    rows[-1]["batch_size"] = 1
    build_report(write_run(tmp_path / "out", rows))
    page = (tmp_path / "out" / "report" / "index.html").read_text(encoding="utf-8")
    assert "Ok images per attention backend" not in page and settings_table(page)["attention"] == "sdpa"
    assert "Ok images per UNet batch size" in page  # two batch sizes: a chart
    assert page.count("<svg") == 3


def test_ids_under_thumbnails(tmp_path):
    long_id = "catalog-2026-11-26-" + "x" * 60 + "-SKU-0042"
    rows = [row(long_id, 0, 0, 3.5), row('a<b>&"c', 0, 0, 7), row("r1", 0, 0, 7, image_index=1)]
    build_report(write_run(tmp_path / "out", rows), thumb_size=128)  # room for 18 characters
    sheet = (tmp_path / "out" / "report" / "index.html").read_text(encoding="utf-8").split("<h2>Contact sheet</h2>")[1]
    ids = re.findall(r'<span class="id" title="([^"]*)">([^<]*)</span>', sheet)
    assert (long_id, "catalog-2…SKU-0042") in ids  # both ends of a long id, whole on hover
    assert ("a&lt;b&gt;&amp;&quot;c", "a&lt;b&gt;&amp;&quot;c") in ids
    assert ("r1 #1", "r1 #1") in ids
    assert f'title="prompt {long_id}\nseed 1000 · {long_id} #0"' in sheet  # prompt and seed still on hover
    assert "a<b>" not in sheet


@pytest.mark.parametrize("setup, message", [
    ("none", "no ledger folder"),
    ("empty", "holds no ledgers"),
    ("garbage", "could be read"),
])
def test_cli_user_errors_exit_2_without_traceback(tmp_path, setup, message):
    out = tmp_path / "out"
    if setup != "none":
        (out / "ledger").mkdir(parents=True)
    if setup == "garbage":
        (out / "ledger" / "shard-00000.parquet").write_text("garbage")
    result = run_cli(tmp_path, f"output_dir={out}")
    assert result.returncode == 2
    assert message in result.stderr.lower()
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_cli_without_output_dir(tmp_path):
    result = run_cli(tmp_path)
    assert result.returncode == 2
    assert "output_dir=DIR" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(run_dir, tmp_path):
    build_report(run_dir)
    page_url = (run_dir / "report" / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1200,2000"]

    def chromium(profile, *extra):
        return subprocess.run(["chromium", *flags, f"--user-data-dir={tmp_path / profile}", *extra, page_url],
                              capture_output=True, text=True, timeout=120)

    dom = chromium("profile-dom", "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images-loaded="6"' in body, body
    assert 'data-charts="3"' in body, body

    screenshot = tmp_path / "page.png"
    chromium("profile-shot", f"--screenshot={screenshot}")
    with Image.open(screenshot) as image:
        assert image.size == (1200, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 50  # not a blank page


def test_report_from_a_tiny_model_run(tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a <b>blue</b> sphere", "a green cone"]}), prompts)
    out = tmp_path / "out"
    render = subprocess.run([sys.executable, "-m", "sdbatch", f"prompts={prompts}", f"output_dir={out}",
                             "model=tiny", "steps=2", "progress=false"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert render.returncode == 0, render.stderr
    result = run_cli(tmp_path, f"output_dir={out}", "merged=true")
    assert result.returncode == 0, result.stderr
    assert "3 images: 3 ok, 0 skipped, 0 failed" in result.stdout
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/jpeg;base64,') == 3
    assert "a &lt;b&gt;blue&lt;/b&gt; sphere" in page
    assert pq.read_table(out / "report" / "merged.parquet").num_rows == 3


def test_ledgers_without_devices_or_stage_times(tmp_path):
    # An older ledger whose device, worker and stage columns are all null (Parquet stores them as null type).
    rows = timeline(0, [3.5, 7])
    out = write_run(tmp_path / "out", rows)
    path = out / "ledger" / "shard-00000.parquet"
    table = pq.read_table(path)
    for name in ("device", "worker_index", "text_encode_s", "denoise_s", "vae_decode_s", "write_s", "batch_size"):
        table = table.set_column(table.column_names.index(name), name, pa.nulls(len(table)))
    pq.write_table(table, path)
    summary = build_report(out)
    assert summary["ok"] == 2 and summary["sessions"] == 1 and summary["wall_s"] == pytest.approx(3.5)
    assert summary["gpu"]["figures"] is None and summary["gpu"]["elsewhere"] == [("unknown device", 2)]
