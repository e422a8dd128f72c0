"""What one worker pays for the size of the manifest: peak RSS, time to its first image, a rerun with nothing to
do, and a nightly run with 1% of the rows changed (mean UNet batch), for manifests of 10k, 1M and 10M rows.

The worker owns 8 shards of 100 rows (800 rows) whatever the manifest's size, as one task of a big array does
(`num_workers` = shards / 8, `worker_index=0`, `steal=false`), on the built-in tiny model (1 step, CPU).

    python scripts/bench_scale.py --rows 10000 1000000 10000000 --out docs/benchmarks/scale-cpu.json
    python scripts/bench_scale.py --baseline /path/to/old/checkout ...   # the same runs with an older sdbatch too
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE, OWN_SHARDS, BATCH = 100, 8, 8


def write_manifest(path: Path, rows: int, changed_every: int | None = None) -> None:
    """id, prompt and three passthrough columns, written a million rows at a time; every `changed_every`-th
    row's prompt differs (tomorrow's catalog)."""
    chunk = 1_000_000
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("prompt", pa.string()), ("price", pa.float64()),
                                           ("category", pa.string()), ("stock", pa.int64())])) as writer:
        for start in range(0, rows, chunk):
            index = np.arange(start, min(rows, start + chunk))
            prompts = [f"studio photo of product {i}, {('red', 'blue', 'green')[i % 3]} leather, white background"
                       + (", new season" if changed_every and i % changed_every == 0 else "") for i in index]
            writer.write_table(pa.table({
                "id": [f"sku-{i:09d}" for i in index], "prompt": prompts, "price": (index % 1000) / 10.0,
                "category": [("bags", "shoes", "lamps", "vases")[i % 4] for i in index], "stock": index % 50,
            }), row_group_size=chunk)


def run(repo: Path, manifest: Path, out: Path, num_workers: int, extra: list[str]) -> dict:
    """One worker process: wall time, time until its first image file, peak RSS, and its summary."""
    command = [sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}", "model=tiny", "steps=1",
               f"batch_size={BATCH}", f"shard_size={SHARD_SIZE}", f"num_workers={num_workers}", "worker_index=0",
               "progress=false", *extra]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    log = out.parent / f"{out.name}.log"
    started = time.time()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)
    first = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4, not poll(): it returns the child's peak RSS
        if pid:
            break
        if first is None and newest_image(out) > started:
            first = time.time() - started
        time.sleep(0.05)
    wall = time.time() - started
    stdout = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} exited {os.waitstatus_to_exitcode(status)}:\n{stdout[-3000:]}")
    rendered = re.search(r"(\d+) images rendered", stdout)
    mean = re.search(r"mean batch ([\d.]+)", stdout)
    return {"wall_s": round(wall, 2), "first_image_s": None if first is None else round(first, 2),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "images_rendered": int(rendered.group(1)) if rendered else None,
            "mean_batch": float(mean.group(1)) if mean else None}


def newest_image(out: Path) -> float:
    images = out / "images"
    if not images.is_dir():
        return 0.0
    return max((p.stat().st_mtime for p in images.rglob("*.png")), default=0.0)


def measure(repo: Path, work: Path, rows: int, label: str, extra: list[str]) -> dict:
    day1, day2 = work / f"day1-{rows}.parquet", work / f"day2-{rows}.parquet"
    if not day1.exists():
        write_manifest(day1, rows)
        write_manifest(day2, rows, changed_every=100)
    out = work / f"out-{label}-{rows}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    num_workers = math.ceil(math.ceil(rows / SHARD_SIZE) / OWN_SHARDS)
    result = {"rows": rows, "sdbatch": label, "num_workers": num_workers,
              "first_run": run(repo, day1, out, num_workers, extra),
              "noop_rerun": run(repo, day1, out, num_workers, extra),
              "nightly_1pct": run(repo, day2, out, num_workers, extra)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--baseline", type=Path, help="a checkout of an older sdbatch to run the same way")
    parser.add_argument("--baseline-rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdbatch-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "scale-cpu.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [measure(REPO, args.work, rows, "this", ["steal=false"]) for rows in args.rows]
    if args.baseline:
        results += [measure(args.baseline, args.work, rows, "baseline", []) for rows in args.baseline_rows]
    report = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
              "worker": f"owns {OWN_SHARDS} shards of {SHARD_SIZE} rows; model=tiny steps=1 batch_size={BATCH}",
              "results": results}
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def table(results: list[dict]) -> str:
    lines = ["| sdbatch | rows | peak RSS GB | first image s | no-op rerun s | nightly 1%: images, mean batch, s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        first, noop, nightly = r["first_run"], r["noop_rerun"], r["nightly_1pct"]
        lines.append(f"| {r['sdbatch']} | {r['rows']:,} | {max(first['peak_rss_gb'], noop['peak_rss_gb']):.2f} | "
                     f"{first['first_image_s']} | {noop['wall_s']} | {nightly['images_rendered']}, "
                     f"{nightly['mean_batch']}, {nightly['wall_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
