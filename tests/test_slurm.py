"""sdbatch under a real Slurm cluster (scripts/ci/slurm-up.sh): job arrays, stepped arrays, interruption and requeue."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "sdbatch.sbatch"
# One thread per task: the test node has 2 CPUs and runs 2 single-CPU tasks at once.
EXPORT = f"--export=ALL,SDBATCH_PYTHON={sys.executable},OMP_NUM_THREADS=1"
FAST = ["model=tiny", "steps=2", "shard_size=5", "batch_size=4", "progress=false"]


def slurm_answers() -> bool:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


needs_slurm = pytest.mark.skipif(not slurm_answers(), reason="no Slurm cluster (start one with scripts/ci/slurm-up.sh)")


def write_manifest(path: Path, rows: int) -> list[str]:
    ids = [f"sku-{i:03d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"a studio photo of product {i}" for i in range(rows)]}), path)
    return ids


def submit(tmp_path: Path, array: str, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    """sbatch --wait in the background; returns the process and the array job id."""
    proc = subprocess.Popen(
        ["sbatch", "--parsable", "--wait", EXPORT, f"--array={array}", f"--output={tmp_path}/%x-%A_%a.out",
         str(SCRIPT), *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch said {job_id!r}: {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc, job_id


def finish(proc: subprocess.Popen, job_id: str, tmp_path: Path, timeout: float = 240) -> int:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id])
        proc.kill()
        pytest.fail(f"Slurm job {job_id} did not finish in {timeout}s\n{logs(tmp_path, job_id)}")
    return proc.returncode


def logs(tmp_path: Path, job_id: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob(f"*-{job_id}_*.out")))


def check_output(out: Path, ids: list[str], num_workers: int) -> list[dict]:
    """Every row exactly once, ok, with a decodable image; no stray or temporary files."""
    rows = [row for path in sorted((out / "ledger").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert sorted(row["id"] for row in rows) == sorted(ids)  # all rows, none twice
    assert {row["status"] for row in rows} == {"ok"}
    for row in rows:
        with Image.open(out / row["image_path"]) as image:
            image.load()
    assert {row["num_workers"] for row in rows} == {num_workers}
    # which worker rendered what is up to work stealing: a task that starts late finds its shards done
    assert {row["worker_index"] for row in rows} <= set(range(num_workers))
    files = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.startswith(".")], "temporary files left behind"
    assert sorted(p.relative_to(out).as_posix() for p in files) == sorted(row["image_path"] for row in rows)
    return rows


@pytest.mark.slurm
@needs_slurm
def test_arrays_render_every_row_once(tmp_path):
    ids = write_manifest(tmp_path / "catalog.parquet", 40)
    # A stepped array: task ids 1,3,5,7 must become workers 0..3 (the dense 0-1 array is the requeue test's).
    proc, job_id = submit(tmp_path, "1-7:2", [f"prompts={tmp_path / 'catalog.parquet'}", f"output_dir={tmp_path / 'out'}",
                                             *FAST])
    assert finish(proc, job_id, tmp_path) == 0, logs(tmp_path, job_id)
    check_output(tmp_path / "out", ids, num_workers=4)


@pytest.mark.slurm
@needs_slurm
def test_interrupted_tasks_requeue_and_finish(tmp_path):
    ids = write_manifest(tmp_path / "catalog.parquet", 60)
    out = tmp_path / "out"
    proc, job_id = submit(tmp_path, "0-1", [f"prompts={tmp_path / 'catalog.parquet'}", f"output_dir={out}",
                                            "model=tiny", "steps=30", "shard_size=5", "batch_size=4", "progress=false"])
    try:
        # Wait until both workers have written images (worker w renders shards s with s % 2 == w).
        deadline = time.monotonic() + 90
        while {int(p.parent.name) % 2 for p in (out / "images").glob("*/*.png")} != {0, 1}:
            assert time.monotonic() < deadline and proc.poll() is None, logs(tmp_path, job_id)
            time.sleep(0.2)
        # Task 0: the time-limit warning (--signal=B:USR1) reaches only the batch shell, which forwards it.
        # Task 1: preemption-like SIGTERM to every process of the job (plain `scancel --signal=TERM` would
        # skip the batch step altogether).
        subprocess.run(["scancel", "--batch", "--signal=USR1", f"{job_id}_0"], check=True)
        subprocess.run(["scancel", "--full", "--signal=TERM", f"{job_id}_1"], check=True)
    except BaseException:
        subprocess.run(["scancel", job_id])
        raise
    # Each task exits 75, requeues itself, and its rerun renders the rest.
    assert finish(proc, job_id, tmp_path) == 0, logs(tmp_path, job_id)
    for task in (0, 1):
        log = (tmp_path / f"sdbatch-{job_id}_{task}.out").read_text()
        assert "requeueing" in log, log
    check_output(out, ids, num_workers=2)


@pytest.mark.slurm
@needs_slurm
def test_hydra_submitit_sweep_is_one_worker_per_job(tmp_path):
    ids = write_manifest(tmp_path / "catalog.parquet", 20)
    out = tmp_path / "out"
    # The CPU test node has no GPUs and little memory: drop the launcher's GPU-node resources.
    done = subprocess.run(
        [sys.executable, "-m", "sdbatch", "-m", "hydra/launcher=slurm", f"prompts={tmp_path / 'catalog.parquet'}",
         f"output_dir={out}", *FAST, "num_workers=2", "worker_index=0,1", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.mem_gb=null", "hydra.launcher.cpus_per_task=1"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    check_output(out, ids, num_workers=2)


def test_slurm_launcher_config_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "sdbatch" / "conf"), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "prompts=x", f"output_dir={tmp_path}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 1
    assert launcher.signal_delay_s > cfg.stop_timeout_s
    assert cfg.hydra.sweep.dir == f"{tmp_path}/.submitit"
    assert launcher.submitit_folder.startswith(f"{tmp_path}/.submitit")
