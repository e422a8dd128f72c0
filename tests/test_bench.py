"""The throughput benchmark runs end to end on a CPU with model=tiny (a smoke test: its numbers mean nothing)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_rows_and_table(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--smoke", "--out", str(out),
                           "--rows", "diffusers-sdpa-best,sdbatch-sdpa,sdbatch-best,sdbatch-best-warm-start"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["rows"]] == ["diffusers-sdpa-best", "sdbatch-sdpa", "sdbatch-best",
                                                   "sdbatch-best-warm-start"]
    assert all(r["images_per_s"] > 0 and r["time_to_first_image_s"] > 0 for r in report["rows"])
    warm = report["rows"][-1]  # the second new process; the first is kept beside it
    assert warm["startup_split_s"]["imports_and_plan"] > 0 and warm["first_process"]["time_to_first_image_s"] > 0
    assert "| sdbatch-best |" in done.stdout
