"""The fleet through the real command line: work stealing, workers in other namespaces, a stalled worker
superseded while still alive, and nightly runs whose few changed rows still fill batches."""

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import read_ledgers, write_manifest
from sdbatch.lease import generation_name, newest_generation
from test_crash import _stop_leftover_processes  # noqa: F401  (stops this module's workers too)
from test_crash import Run, assert_exactly_once, images_on_disk, live_leases, wait_for


@pytest.fixture
def catalog(tmp_path) -> Path:
    return write_manifest(tmp_path / "catalog.parquet", {
        "id": [f"item-{i:02d}" for i in range(36)],
        "prompt": [f"studio photo of product {i}, white background" for i in range(36)],
        "num_images": [2 if i in {3, 11, 20, 29} else None for i in range(36)],
    })


def test_two_of_three_workers_render_the_shards_of_one_that_never_started(tmp_path, catalog):
    out = tmp_path / "out"
    workers = [Run(tmp_path, catalog, out, "steps=2", "shard_size=6", "num_workers=3", f"worker_index={i}")
               for i in (0, 1)]  # worker 2's array task never ran
    assert [w.wait() for w in workers] == [0, 0], [w.stderr for w in workers]
    rows = assert_exactly_once(out)
    assert {r["worker_index"] for r in rows} <= {0, 1}  # both, unless one started so late that the other stole all
    orphaned = {r["shard"] for r in rows if r["shard"] % 3 == 2}
    assert orphaned, "worker 2 owned no shard with images"
    helped = sum(w.summary("of other workers' rendered")[0] for w in workers)
    assert helped >= len(orphaned)


def unshare_works() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-u", "-p", "-f", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs root and unshare (UTS and PID namespaces)")
def test_a_worker_killed_in_another_namespace_is_taken_over_when_its_lease_expires(tmp_path, catalog):
    """Another host's worker (its own hostname, PID namespace and PID 1) dies holding leases; a requeued task in yet
    another namespace cannot tell whether it lives, so it waits for the leases to expire, then finishes everything."""
    out = tmp_path / "out"

    def in_namespace(host: str) -> list[str]:
        return ["unshare", "-u", "-p", "-f", "sh", "-c", f'hostname {host} && exec "$0" "$@"']

    first = Run(tmp_path, catalog, out, "steps=20", "lease_s=4", prefix=in_namespace("node-a"))
    first.wait_started()
    wait_for(lambda: len(images_on_disk(out)) >= 4, 120)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.wait()
    held = [newest_folder(out / "leases" / name) for name in live_leases(out)]
    assert held, "the killed worker held no lease: the test did not test the takeover"
    second = Run(tmp_path, catalog, out, "steps=20", "lease_s=4", prefix=in_namespace("node-b"))
    # Until the new worker has looked, the dead worker's leases stay fresh (as if it had died a moment ago): it
    # must wait for them, naming the holder, since nothing tells it for certain that a foreign worker is gone.
    touch = lambda: [os.utime(folder) for folder in held]  # noqa: E731
    wait_for(lambda: "is held by worker 0 of 1" in second.stderr or second.proc.poll() is not None, 120, check=touch)
    assert second.wait() == 0, second.stderr
    assert "is held by worker 0 of 1" in second.stderr
    assert_exactly_once(out)


def newest_folder(lease: Path) -> Path:
    return lease / generation_name(newest_generation(lease))


def test_a_stalled_worker_is_superseded_and_its_late_writes_are_refused(tmp_path, catalog):
    """A worker frozen past its lease (SIGSTOP: a paused VM, a GC pause) while a requeued copy starts: the copy
    takes its shards over once the leases expire; the thawed worker's writes are fenced off; exactly once."""
    out = tmp_path / "out"
    stalled = Run(tmp_path, catalog, out, "steps=20", "lease_s=3", "batch_size=2")
    stalled.wait_started()
    wait_for(lambda: len(images_on_disk(out)) >= 2, 120)
    stalled.proc.send_signal(signal.SIGSTOP)
    requeued = Run(tmp_path, catalog, out, "steps=20", "lease_s=3", "batch_size=2")
    assert requeued.wait() == 0, requeued.stderr
    assert_exactly_once(out)
    before = {r["image_path"]: r["content_key"] for r in read_ledgers(out)}
    stalled.proc.send_signal(signal.SIGCONT)
    assert stalled.wait() == 0, stalled.stderr  # its own shards are complete: by the worker that took them over
    assert "was taken over by another worker" in stalled.stderr
    assert_exactly_once(out)
    assert {r["image_path"]: r["content_key"] for r in read_ledgers(out)} == before


def test_a_nightly_run_with_few_changed_rows_per_shard_still_fills_its_batches(tmp_path):
    ids = [f"sku-{i:03d}" for i in range(200)]
    day1 = write_manifest(tmp_path / "day1.parquet", {"id": ids, "prompt": [f"product {i}" for i in ids]})
    out = tmp_path / "out"
    first = Run(tmp_path, day1, out, "steps=1", "shard_size=10", "batch_size=32")
    assert first.wait() == 0, first.stderr
    changed = {sku for shard in range(20) for sku in sorted(i for i in ids if _shard(i) == shard)[:2]}
    day2 = write_manifest(tmp_path / "day2.parquet", {
        "id": ids, "prompt": [f"product {i}, new season" if i in changed else f"product {i}" for i in ids]})
    nightly = Run(tmp_path, day2, out, "steps=1", "shard_size=10", "batch_size=8")
    assert nightly.wait() == 0, nightly.stderr
    assert nightly.summary("images rendered") == [len(changed)] and len(changed) == 40
    mean = float(re.search(r"mean batch ([\d.]+)", nightly.stdout).group(1))
    assert mean >= 0.9 * 8, f"2 changed rows in each of 20 shards gave batches of {mean} on average"


def _shard(row_id: str) -> int:
    from sdbatch.plan import shard_of
    return shard_of(row_id, 20)


def test_no_lease_is_left_held_after_any_ending(tmp_path, catalog):
    out = tmp_path / "out"
    run = Run(tmp_path, catalog, out, "steps=20", "stop_timeout_s=30")
    run.wait_started()
    wait_for(lambda: len(images_on_disk(out)) >= 2, 120)
    run.proc.send_signal(signal.SIGINT)  # Ctrl-C stops like SIGTERM, with the shell's code for it
    assert run.wait() == 130, run.stderr
    assert "Traceback" not in run.stderr and "interrupted: rerun the same command to continue (exit code 130)" in run.stdout
    assert not live_leases(out)
    done = Run(tmp_path, catalog, out, "steps=20")
    assert done.wait() == 0, done.stderr
    assert_exactly_once(out)
