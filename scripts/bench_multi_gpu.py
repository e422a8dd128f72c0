"""Several GPUs of one machine: the same `python -m sdbatch` command on one GPU and on all of them
(`processes=auto`), then as one "array task" per GPU (worker_index i of n, one GPU each); steady images/s against
one GPU, each physical GPU's share, the time until every GPU renders, exactly-once output and equal pixels.

    python scripts/bench_multi_gpu.py --images 384 --out docs/benchmarks/multi-gpu-h100-x2.json

Steady images/s add up each worker's own rate over its full batches after the first (which carries load and
warm-up): the partial batches and uneven tail of a finite catalog's end are left out. Beside it: the rate in the window where every worker
renders, the rate up to the last image, and each worker's GPU seconds per image (denoise, VAE) from the ledger. `--gpus 2` on a bigger machine uses its first two GPUs; a one-GPU run
already in `--work` is reused, so several GPU counts compare against one baseline.

Shards hold `--shard-size` rows (default: enough for several full batches per worker), and batches fill across
shards, so every UNet call is full. On a one-GPU machine the "all GPUs" run is the one-GPU run again.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def render(out: Path, manifest: Path, args, gpus: str, *extra: str, background: bool = False):
    command = [sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}", f"model={args.model}",
               "model.random_weights=true", f"batch_size={args.batch}", f"steps={args.steps}", "progress=false",
               f"shard_size={args.shard_size}", f"attention={args.attention}", f"compile={str(args.compile).lower()}",
               *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    return process if background else process.wait()


def ledger(out: Path) -> list[dict]:
    return [r for f in (out / "ledger").glob("*.parquet") for r in pq.read_table(f).to_pylist()]


def measure(name: str, out: Path, started: float, images: int, batch: int) -> dict:
    rows = ledger(out)
    keys = [(r["id"], r["image_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == images, f"{name}: {len(keys)} ledger rows, {len(set(keys))} distinct"
    assert all(r["status"] == "ok" and (out / r["image_path"]).exists() for r in rows), f"{name}: missing images"
    return rates(name, rows, started, batch)


def rates(name: str, rows: list[dict], started: float, batch: int) -> dict:
    finished = sorted(r["finished_at"].timestamp() for r in rows)
    workers = {}
    for r in rows:
        workers.setdefault(f"worker {r['worker_index']} on {r['device']}", []).append(r)
    per_worker = {worker: worker_rates(mine, batch, started) for worker, mine in workers.items()}
    first_batches = len(workers) * batch
    return {"name": name, "images": len(rows), "wall_s": finished[-1] - started,
            "images_per_s_wall": len(rows) / (finished[-1] - started),
            "images_per_s_steady": sum(w["images_per_s_steady"] for w in per_worker.values()),
            "images_per_s_window": window_rate(rows, batch),
            "images_per_s_to_last_image": (len(rows) - first_batches) / (finished[-1] - finished[first_batches - 1]),
            "per_worker": per_worker, "all_gpus_rendering_after_s": max(w["first_image_s"] for w in per_worker.values()),
            "batch_sizes": sorted({(r["worker_index"], r["batch_size"]) for r in rows})}


def batches(rows: list[dict]) -> list[tuple[int, float]]:
    """One worker's batches in order, as (size, finished): a worker renders one batch at a time, and each of its
    rows carries the batch's size."""
    rows = sorted(rows, key=lambda r: r["finished_at"])
    done, at = [], 0
    while at < len(rows):
        size = rows[at]["batch_size"]
        done.append((size, max(r["finished_at"].timestamp() for r in rows[at:at + size])))
        at += size
    return done


def worker_rates(rows: list[dict], batch: int, started: float) -> dict:
    """One worker's steady rate: its full batches after the first (which carries load and warm-up), each timed from
    the end of the batch before; the partial batches of the catalog's end are left out. Also its GPU seconds per
    image."""
    done = batches(rows)
    full = [(size, end - before) for (size, end), (_, before) in zip(done[1:], done) if size == batch]
    return {"images": len(rows), "first_image_s": min(r["finished_at"].timestamp() for r in rows) - started,
            "batches": len(done), "full_batches_timed": len(full),
            "images_per_s_steady": sum(s for s, _ in full) / sum(t for _, t in full) if full else 0.0,
            "denoise_s_per_image": sum(r["denoise_s"] or 0 for r in rows) / len(rows),
            "vae_decode_s_per_image": sum(r["vae_decode_s"] or 0 for r in rows) / len(rows)}


def window_rate(rows: list[dict], batch: int) -> float:
    """Images/s while every worker renders: from the moment the last worker finished its first batch to the moment
    the first worker finished its last one (the start-up and the end's uneven tail left out). Workers finish whole
    batches, so the window's edges cut batches: within a batch of the true rate over a long run only."""
    by_worker = {}
    for r in rows:
        by_worker.setdefault(r["worker_index"], []).append(r["finished_at"].timestamp())
    begin = max(sorted(times)[min(batch, len(times)) - 1] for times in by_worker.values())
    end = min(max(times) for times in by_worker.values())
    done = sum(begin < t <= end for times in by_worker.values() for t in times)
    return done / (end - begin) if end > begin else float("nan")


def same_images(a: Path, b: Path) -> dict:
    """The largest pixel difference between the images both folders hold (the one-GPU run's rows)."""
    rows_b = {(r["id"], r["image_index"]): r for r in ledger(b)}
    worst, compared = 0, 0
    for row in ledger(a):
        other = rows_b[(row["id"], row["image_index"])]
        assert row["content_key"] == other["content_key"], row["id"]
        pa_, pb = (np.asarray(Image.open(d / r["image_path"]), dtype=int) for d, r in ((a, row), (b, other)))
        worst, compared = max(worst, int(np.abs(pa_ - pb).max())), compared + 1
    return {"compared": compared, "max_pixel_difference": worst}


def write_catalog(path: Path, images: int) -> None:
    """Rows sku-00000... : the baseline's rows are the first rows of the bigger catalog (same pixels to compare)."""
    pq.write_table(pa.table({"id": [f"sku-{i:05d}" for i in range(images)],
                             "prompt": [f"studio photo of product {i}, white background" for i in range(images)]}), path)


def one_gpu_run(work: Path, catalog: Path, args) -> dict:
    """The one-GPU baseline, measured once per --work folder and reused by later GPU counts."""
    saved = work / "one_gpu.json"
    if saved.exists():
        return json.loads(saved.read_text())
    start = time.time()
    assert render(work / "one_gpu", catalog, args, "0") == 0, "one GPU"
    run = measure("one GPU", work / "one_gpu", start, args.images_one_gpu, args.batch)
    print(run, flush=True)
    saved.write_text(json.dumps(run, default=str))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--images", type=int, default=768, help="images of the multi-GPU runs")
    parser.add_argument("--images-one-gpu", type=int, default=256, help="images of the one-GPU baseline (a rate)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--shard-size", type=int, default=32, help="rows per shard: small enough to steal at the end")
    parser.add_argument("--gpus", type=int, default=0, help="use the first N GPUs (default: all)")
    parser.add_argument("--work", default="/tmp/sdbatch-multi-gpu")
    parser.add_argument("--out", default="docs/benchmarks/multi-gpu-h200.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest, baseline = work / "catalog.parquet", work / "catalog-one-gpu.parquet"
    write_catalog(manifest, args.images)
    write_catalog(baseline, args.images_one_gpu)
    count = args.gpus or torch.cuda.device_count()
    all_gpus = ",".join(str(i) for i in range(count))
    report = {"gpus": [torch.cuda.get_device_name(i) for i in range(count)], "gpus_on_machine": torch.cuda.device_count(),
              "command": " ".join(sys.argv),
              "runs": [one_gpu_run(work, baseline, args)]}
    all_out, tasks_out = work / f"gpus_{count}", work / f"array_tasks_{count}"
    start = time.time()
    assert render(all_out, manifest, args, all_gpus) == 0
    report["runs"].append(measure(f"{count} GPUs, processes=auto", all_out, start, args.images, args.batch))
    print(report["runs"][-1], flush=True)
    start = time.time()
    tasks = [render(tasks_out, manifest, args, str(i), f"worker_index={i}", f"num_workers={count}", background=True)
             for i in range(count)]
    assert [t.wait() for t in tasks] == [0] * count
    report["runs"].append(measure(f"{count} array tasks", tasks_out, start, args.images, args.batch))
    print(report["runs"][-1], flush=True)
    report["same_images_as_one_gpu"] = {"processes=auto": same_images(work / "one_gpu", all_out),
                                        "array tasks": same_images(work / "one_gpu", tasks_out)}
    one = report["runs"][0]
    report["scaling_steady"] = {run["name"]: run["images_per_s_steady"] / one["images_per_s_steady"]
                                for run in report["runs"][1:]}
    report["scaling_window"] = {run["name"]: run["images_per_s_window"] / one["images_per_s_steady"]
                                for run in report["runs"][1:]}
    report["scaling_to_last_image"] = {run["name"]: run["images_per_s_to_last_image"] / one["images_per_s_steady"]
                                       for run in report["runs"][1:]}
    print(json.dumps(report, indent=1, default=str))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
