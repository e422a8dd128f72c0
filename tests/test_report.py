"""The HTML report, from ledgers and PNGs made here (and, when the renderer is present, from a tiny-model run)."""

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
    assert summary["stage_s"]["denoise_s"] == pytest.approx(7.0)
    assert summary["page"] == run_dir / "report" / "index.html" and summary["merged"] is None
    assert summary["thumbnails"] == 10 and summary["unreadable"] == []


def test_page_is_escaped_linked_and_ordered(run_dir):
    build_report(run_dir, thumb_size=96)
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")

    assert '<script>alert("x")' not in page
    assert "a cat &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;friends&quot;" in page
    assert RTL_PROMPT in page
    assert page.count("<svg") == 4

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
    assert "wall time 13.5s, 0.519 images/s" in out
    assert "worker 0 · cpu: 5 images" in out and "worker 1 · cuda:0 (NVIDIA H200): 2 images" in out
    assert f"report: {run_dir / 'report' / 'index.html'}" in out
    assert (run_dir / "report" / "merged.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .hydra/ or outputs/ beside it


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
    assert 'data-charts="4"' in body, body

    screenshot = tmp_path / "page.png"
    chromium("profile-shot", f"--screenshot={screenshot}")
    with Image.open(screenshot) as image:
        assert image.size == (1200, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 50  # not a blank page


def renderer_landed() -> bool:
    return (REPO / "sdbatch" / "run.py").is_file() and (REPO / "sdbatch" / "__main__.py").is_file()


@pytest.mark.skipif(not renderer_landed(), reason="the renderer (sdbatch/run.py) has not landed yet")
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
