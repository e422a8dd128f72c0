"""Crash and preemption safety through the real command line: kill -9, SIGTERM/SIGUSR1, duplicate workers,
stale and live leases, a failing disk and two worker processes. Every run must end exactly once, readable and in
the ledger, and no lease may be left held."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import read_ledgers, write_manifest
from sdbatch.lease import Holder, generation_name, newest_generation
from sdbatch.writer import TEMP_PREFIX

ROWS = 36  # four of them render two images: 40 images in 4 shards of ~10, 5 batches of 2 per shard
TWICE = {3, 11, 20, 29}
EXPECTED = sorted((f"item-{i:02d}", k) for i in range(ROWS) for k in range(2 if i in TWICE else 1))
BASE = ["model=tiny", "progress=false", "batch_size=2", "shard_size=10", "steps=20"]
STARTED = re.compile(r"worker \d+ of \d+ .*: \d+ of \d+ shards are its own")  # logged right before rendering


# ---------------------------------------------------------------- helpers
@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_manifest(tmp_path / "catalog.parquet", {
        "id": [f"item-{i:02d}" for i in range(ROWS)],
        "prompt": [f"studio photo of product {i}, white background" for i in range(ROWS)],
        "num_images": [2 if i in TWICE else None for i in range(ROWS)],
    })


class Run:
    """One `python -m sdbatch` process with its output in files (no pipe to fill up and block it)."""

    def __init__(self, tmp_path: Path, manifest: Path, out: Path, *extra: str, prefix: list[str] = ()):
        Run.count = getattr(Run, "count", 0) + 1
        self.log = tmp_path / f"run-{Run.count}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
               "OMP_NUM_THREADS": "1"}  # one thread each: spinning OpenMP threads crawl on a shared 2-core machine
        for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SDBATCH_LOCAL_RANK", "SDBATCH_LOCAL_COUNT"):
            env.pop(name, None)
        with open(f"{self.log}.out", "w") as stdout, open(f"{self.log}.err", "w") as stderr:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "sdbatch", f"prompts={manifest}", f"output_dir={out}", *BASE, *extra],
                cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        RUNNING.append(self.proc)

    @property
    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text(encoding="utf-8")

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text(encoding="utf-8")

    def wait_started(self, count: int = 1, timeout: float = 120) -> None:
        """Until `count` workers have loaded the model and begun rendering."""
        wait_for(lambda: len(STARTED.findall(self.stderr)) >= count or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, f"the run ended before it was signalled:\n{self.stdout}\n{self.stderr}"

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)

    def summary(self, what: str) -> list[int]:
        """Numbers from the summary lines, e.g. summary('images rendered') -> one per worker."""
        return [int(n) for n in re.findall(rf"(\d+) {what}", self.stdout)]


RUNNING: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_leftover_processes():
    """A failed test must not leave its workers running: stop the process groups this test started."""
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def wait_for(condition, timeout: float, every: float = 0.05, check=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if check:
            check()
        assert time.monotonic() < deadline, f"timed out after {timeout}s"
        time.sleep(every)


def images_on_disk(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png") if not p.name.startswith(TEMP_PREFIX)}


def ledger_paths(out: Path, status: str = "ok") -> set[str]:
    return {r["image_path"] for r in read_ledgers(out) if r["status"] == status}


def assert_ledgers_behind_images(out: Path) -> None:
    """At every moment: each ledger row that says ok has its image on disk (ledgers are written after images)."""
    for path in (out / "ledger").glob("shard-*.parquet"):
        for row in pq.read_table(path, columns=["image_path", "status"]).to_pylist():
            if row["status"] == "ok":
                assert (out / row["image_path"]).is_file(), f"{path.name} lists {row['image_path']}, not on disk"


def assert_exactly_once(out: Path) -> list[dict]:
    """The end state: every image once in the ledgers, all ok, all decodable, no temp or stray files."""
    rows = read_ledgers(out)
    idents = [(r["id"], r["image_index"]) for r in rows]
    assert len(idents) == len(set(idents)), "an image is in the ledgers twice"
    assert sorted(idents) == EXPECTED
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["image_path"] for r in rows} == images_on_disk(out), "image files and ledger rows differ"
    for r in rows:
        with Image.open(out / r["image_path"]) as image:
            image.load()
        assert r["shard"] == int(r["image_path"].split("/")[1])
    leftovers = [p for p in out.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not live_leases(out), "a lease was left held"
    return rows


def live_leases(out: Path) -> list[str]:
    """Leases whose newest generation has not been released (released ones have their mtime set to 0)."""
    held = []
    for folder in (out / "leases").glob("*"):
        newest = newest_generation(folder)
        if newest is not None and (folder / generation_name(newest)).stat().st_mtime > 0:
            held.append(folder.name)
    return held


# ---------------------------------------------------------------- kill -9
def test_kill_9_at_random_points_then_rerun_renders_everything_exactly_once(tmp_path, manifest):
    out = tmp_path / "out"
    seed = int(os.environ.get("SDBATCH_CRASH_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    print(f"SDBATCH_CRASH_SEED={seed}")
    for _ in range(2):
        run = Run(tmp_path, manifest, out)
        run.wait_started()
        kill_at = time.monotonic() + rng.uniform(0.2, 2.0)
        wait_for(lambda: time.monotonic() > kill_at, 10, check=lambda: assert_ledgers_behind_images(out))
        assert run.proc.poll() is None, "the run finished before kill -9 landed: make it longer"
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        assert_ledgers_behind_images(out)

    in_ledger = ledger_paths(out)
    orphans = {p: (out / p).stat().st_mtime_ns for p in images_on_disk(out) - in_ledger}  # written, never recorded
    assert len(in_ledger) + len(orphans) < len(EXPECTED), "the kills came too late to leave work undone"
    for shard in range(4):  # what a kill in the middle of a write leaves, in every shard (finished ones too)
        (out / "images" / f"{shard:05d}").mkdir(parents=True, exist_ok=True)
        (out / "images" / f"{shard:05d}" / f"{TEMP_PREFIX}item-99-0123456789ab_0.png-x1y2z3").write_bytes(b"\x89PNG")
        (out / "ledger").mkdir(exist_ok=True)
        (out / "ledger" / f"{TEMP_PREFIX}shard-{shard:05d}.parquet-x1y2z3").write_bytes(b"PAR1")
    final = Run(tmp_path, manifest, out)
    wait_for(lambda: final.proc.poll() is not None, 240, every=0.25, check=lambda: assert_ledgers_behind_images(out))
    assert final.wait() == 0, final.stderr
    assert_exactly_once(out)
    # Written-but-unrecorded images are adopted as they are, never rendered again.
    assert final.summary("recovered from an earlier run") == [len(orphans)], final.stdout
    assert final.summary("images rendered") == [len(EXPECTED) - len(in_ledger) - len(orphans)], final.stdout
    assert {p: (out / p).stat().st_mtime_ns for p in orphans} == orphans
    assert (out / next(iter(images_on_disk(out)))).stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- SIGTERM / SIGUSR1
def test_stop_signals_record_what_was_rendered_and_exit_75(tmp_path, manifest):
    out = tmp_path / "out"
    # SIGTERM mid-shard: the batch in flight finishes, the shard's ledger is written, exit 75.
    run = Run(tmp_path, manifest, out, "stop_timeout_s=20")
    run.wait_started()
    wait_for(lambda: len(images_on_disk(out)) >= 3, 60)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    assert "received SIGTERM" in run.stderr
    assert "interrupted: rerun the same command to continue (exit code 75)" in run.stdout
    assert ledger_paths(out) == images_on_disk(out), "an image on disk is missing from the ledger (or the reverse)"
    first = len(ledger_paths(out))
    assert 3 <= first < len(EXPECTED)

    # SIGUSR1 (Slurm's warning ahead of the time limit) on the rerun: the same.
    run = Run(tmp_path, manifest, out, "stop_timeout_s=20")
    run.wait_started()
    wait_for(lambda: len(images_on_disk(out)) >= first + 2, 60)
    run.proc.send_signal(signal.SIGUSR1)
    assert run.wait() == 75, run.stderr
    assert "received SIGUSR1" in run.stderr
    assert "interrupted: rerun the same command to continue (exit code 75)" in run.stdout
    assert ledger_paths(out) == images_on_disk(out)
    assert first + 2 <= len(ledger_paths(out)) < len(EXPECTED)

    in_ledger, on_disk = ledger_paths(out), images_on_disk(out)
    final = Run(tmp_path, manifest, out)
    assert final.wait() == 0, final.stderr
    assert_exactly_once(out)
    assert final.summary("unchanged") == [len(in_ledger)]
    assert final.summary("images rendered") == [len(EXPECTED) - len(on_disk)], final.stdout


def test_a_batch_outlasting_stop_timeout_is_abandoned_within_the_bound(tmp_path, manifest):
    out = tmp_path / "out"
    run = Run(tmp_path, manifest, out, "stop_timeout_s=1", "batch_size=8", "steps=100")  # a batch takes ~10s
    run.wait_started()
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 75, run.stderr
    assert "did not finish within 1s" in run.stderr
    assert_ledgers_behind_images(out)
    assert len(images_on_disk(out)) < len(EXPECTED)
    assert not live_leases(out), "giving up left a lease held: a requeued task would have to wait for it"


# ---------------------------------------------------------------- two workers on one shard
def test_duplicate_workers_at_once_render_each_image_once(tmp_path, manifest):
    out = tmp_path / "out"
    first, second = Run(tmp_path, manifest, out), Run(tmp_path, manifest, out)  # a duplicated pod
    assert first.wait() == 0, first.stderr
    assert second.wait() == 0, second.stderr
    assert_exactly_once(out)
    assert sum(first.summary("images rendered") + second.summary("images rendered")) == len(EXPECTED)


def plant_lease(out: Path, shard: int, holder: Holder, age_s: float = 0) -> Path:
    """A lease on a shard as another worker would have left it."""
    folder = out / "leases" / f"shard-{shard:05d}" / generation_name(1)
    folder.mkdir(parents=True)
    (folder / "holder.json").write_text(json.dumps(asdict(holder)))
    os.utime(folder, (time.time() - age_s,) * 2)
    return folder


def test_dead_and_expired_leases_are_taken_over_and_a_live_one_is_waited_for(tmp_path, manifest):
    out = tmp_path / "out"
    me = Holder.this_process("planted")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is now free: a worker that died on this host, in this PID namespace
    plant_lease(out, 0, Holder("dead", "worker 7 of 9", me.host, me.boot_id, me.pid_namespace, dead.pid, "1"))
    live = subprocess.Popen(["sleep", "120"], start_new_session=True)  # alive: renews its lease, then stops
    RUNNING.append(live)
    live_lease = plant_lease(out, 1, Holder("live", "worker 8 of 9", me.host, me.boot_id, me.pid_namespace, live.pid,
                                            _start_of(live.pid)))
    plant_lease(out, 2, Holder("far", "worker 5 of 9", "another-host", "b", "ns", 4242, "1"), age_s=3600)
    run = Run(tmp_path, manifest, out, "steps=2", "lease_s=4")
    # the live holder renews its lease until our worker has seen it and is waiting, then stops renewing
    wait_for(lambda: "shard 1 is held by worker 8 of 9" in run.stderr, 120, check=lambda: os.utime(live_lease))
    assert run.wait() == 0, run.stderr
    assert f":{live.pid}" in run.stderr  # the log names the holder's host and pid
    assert_exactly_once(out)  # shards 0 and 2 at once; shard 1 once its lease expired


def _start_of(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


# ---------------------------------------------------------------- a failing disk
def test_a_failing_write_is_a_clear_error_and_what_was_written_is_recorded(tmp_path, manifest):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "00001").write_text("a file where shard 1's image folder should be")
    run = Run(tmp_path, manifest, out, "steps=2")
    assert run.wait() == 2, run.stderr
    assert "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("sdbatch: error: Writing an image under ") and str(out / "images" / "00001") in error
    assert "rerun" in error
    assert ledger_paths(out) == images_on_disk(out)  # shard 0's images are all recorded
    assert {p.split("/")[1] for p in images_on_disk(out)} == {"00000"}
    assert ledger_paths(out) == {r["image_path"] for r in read_ledgers(out) if r["shard"] == 0} != set()
    assert_ledgers_behind_images(out)

    (out / "images" / "00001").unlink()  # the disk is fixed: the rerun completes
    rerun = Run(tmp_path, manifest, out, "steps=2")
    assert rerun.wait() == 0, rerun.stderr
    assert_exactly_once(out)


# ---------------------------------------------------------------- two worker processes on one machine
def test_two_worker_processes_split_the_plan_and_forward_sigterm(tmp_path, manifest):
    out = tmp_path / "out"
    run = Run(tmp_path, manifest, out, "processes=2", "stop_timeout_s=20")
    run.wait_started(count=2)
    wait_for(lambda: {int(p.split("/")[1]) % 2 for p in images_on_disk(out)} == {0, 1}, 60)
    run.proc.send_signal(signal.SIGTERM)  # to the launcher only: it forwards to both workers
    assert run.wait() == 75, run.stderr
    assert run.stdout.count("interrupted: rerun the same command") == 2, run.stdout
    assert ledger_paths(out) == images_on_disk(out)
    assert len(images_on_disk(out)) < len(EXPECTED)

    rerun = Run(tmp_path, manifest, out, "processes=2")
    assert rerun.wait() == 0, rerun.stderr
    rows = assert_exactly_once(out)
    assert {r["worker_index"] for r in rows} == {0, 1}
    assert {r["num_workers"] for r in rows} == {2}
    assert len(rerun.summary("images rendered")) == 2
