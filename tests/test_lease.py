"""Leases: exclusive, expiring, renewed by a heartbeat, fenced; stress-tested by processes racing for one shard."""

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdbatch.lease import Heartbeat, Holder, Lease, LeaseLost, generation_name

HERE = Path(__file__).resolve().parent


def holder(name: str = "worker 0 of 1") -> Holder:
    return Holder.this_process(name)


def test_one_holder_at_a_time_and_the_busy_holder_is_named(tmp_path):
    first, second = Lease(tmp_path / "shard-00001", holder(), 60), Lease(tmp_path / "shard-00001", holder(), 60)
    assert first.acquire() is None and first.generation == 1
    busy = second.acquire()
    assert busy is not None and busy.generation == 1 and busy.holder["token"] == first.holder.token
    assert f"{os.getpid()}" in busy.describe() and "generation 1" in busy.describe()
    first.release()
    assert second.acquire() is None and second.generation == 2
    assert not (tmp_path / "shard-00001" / generation_name(1)).exists()  # fenced away


def test_an_expired_lease_is_taken_over_and_its_late_writes_are_refused(tmp_path):
    old = Lease(tmp_path / "shard", Holder("t-old", "old", "other-host", "", "", 1, "1"), lease_s=0.2)
    assert old.acquire() is None
    (old.staging / "ledger.tmp").write_text("late")
    time.sleep(0.3)  # no heartbeat: expired
    new = Lease(tmp_path / "shard", holder(), lease_s=0.2)
    assert new.acquire() is None and new.generation == 2
    with pytest.raises(LeaseLost):
        old.commit(old.staging / "ledger.tmp", tmp_path / "ledger.parquet")
    assert not (tmp_path / "ledger.parquet").exists()
    assert not old.renew() and old.lost


def test_a_live_lease_on_another_host_is_respected_until_it_expires(tmp_path):
    remote = Lease(tmp_path / "shard", Holder("t", "remote", "other-host", "b", "ns", os.getpid(), "x"), 0.5)
    assert remote.acquire() is None
    local = Lease(tmp_path / "shard", holder(), 0.5)
    assert local.acquire() is not None  # another host: its PID says nothing here
    assert remote.renew()
    time.sleep(0.6)
    assert local.acquire() is None


def test_a_dead_process_in_this_namespace_is_known_gone_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = holder()
    gone = Holder("t", "gone", me.host, me.boot_id, me.pid_namespace, dead.pid, "12345")
    assert Lease(tmp_path / "shard", gone, 3600).acquire() is None
    assert Lease(tmp_path / "shard", me, 3600).acquire() is None  # no need to wait an hour
    same_pid_other_namespace = Holder("t", "pid 1", me.host, me.boot_id, "pid:[1]", 1, "1")
    assert not me.certainly_gone(json.loads(json.dumps(same_pid_other_namespace.__dict__)))


def test_the_heartbeat_keeps_a_lease_alive_through_a_long_batch(tmp_path):
    mine = Lease(tmp_path / "shard", holder(), lease_s=0.4)
    assert mine.acquire() is None
    beat = Heartbeat(0.4)
    beat.add(mine)
    try:
        time.sleep(1.5)  # a "batch" far longer than the lease
        assert Lease(tmp_path / "shard", holder(), 0.4).acquire() is not None
    finally:
        beat.stop()


def test_commit_moves_a_staged_file_into_place(tmp_path):
    mine = Lease(tmp_path / "leases" / "shard", holder(), 60)
    assert mine.acquire() is None
    (mine.staging / "x.tmp").write_text("data")
    mine.commit(mine.staging / "x.tmp", tmp_path / "x")
    assert (tmp_path / "x").read_text() == "data"


# ---------------------------------------------------------------- stress: processes racing for one shard
def stress_worker(folder: str, state: str, seconds: float, seed: int, result: str) -> None:
    """Loop: take the lease, do fenced read-modify-write commits of one shared file, sometimes stall past the
    expiry (so others break the lease) or vanish without releasing. Counts the commits that claimed success."""
    rng = random.Random(seed)
    me = holder(f"stress {seed}")
    lease_s = 0.3
    beat = Heartbeat(lease_s)
    done, refused, takeovers = 0, 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lease = Lease(Path(folder), me, lease_s)
        try:
            busy = lease.acquire()
        except LeaseLost:
            continue
        if busy:
            time.sleep(rng.uniform(0, 0.02))
            continue
        beat.add(lease)
        for _ in range(rng.randint(1, 6)):
            try:
                entries = json.loads(Path(state).read_text()) if Path(state).exists() else []
                if rng.random() < 0.08:  # stall with no heartbeat: a GC pause, a frozen VM
                    beat.remove(lease)
                    time.sleep(lease_s * rng.uniform(1.2, 2.0))
                temp = lease.staging / f".tmp-{seed}-{len(entries)}"
                temp.write_text(json.dumps(entries + [[seed, lease.generation]]))
                lease.commit(temp, Path(state))
                done += 1
            except (LeaseLost, FileNotFoundError):
                refused += 1
                break
        beat.remove(lease)
        if rng.random() < 0.1:
            takeovers += 1  # vanish without releasing: the next taker waits for the expiry
        else:
            lease.release()
    beat.stop()
    Path(result).write_text(json.dumps({"done": done, "refused": refused, "abandoned": takeovers}))


def test_stress_processes_never_hold_one_shard_twice(tmp_path):
    """Several processes acquire, heartbeat, stall and abandon one lease for 30 s. Every commit that reported
    success is in the shared file, in generation order: no lost update, so never two holders at once."""
    folder, state, seconds = tmp_path / "leases" / "shard-00000", tmp_path / "state.json", 30
    code = ("import sys; sys.path.insert(0, {here!r}); from test_lease import stress_worker; "
            "stress_worker({folder!r}, {state!r}, {seconds}, {seed}, {result!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(
        here=str(HERE), folder=str(folder), state=str(state), seconds=seconds, seed=seed,
        result=str(tmp_path / f"result-{seed}.json"))]) for seed in range(4)]
    assert [p.wait(timeout=seconds + 120) for p in procs] == [0] * 4
    results = [json.loads((tmp_path / f"result-{seed}.json").read_text()) for seed in range(4)]
    entries = json.loads(state.read_text())
    print(results, len(entries), "commits; last generation", entries[-1][1])
    assert len(entries) == sum(r["done"] for r in results)  # every reported success landed: no overwrite
    for seed, result in enumerate(results):
        assert sum(1 for s, _ in entries if s == seed) == result["done"]
    generations = [g for _, g in entries]
    assert generations == sorted(generations)  # never an older holder's write after a newer one's
    assert sum(r["refused"] for r in results) > 0, "no late write was ever refused: the test did not stress"
    assert len(set(generations)) > 20


def test_the_heartbeat_thread_outlives_a_busy_interpreter(tmp_path):
    """A pure-Python loop holding the GIL (like compiling) must not starve the heartbeat."""
    mine = Lease(tmp_path / "shard", holder(), lease_s=0.4)
    assert mine.acquire() is None
    beat = Heartbeat(0.4)
    beat.add(mine)
    stop = time.monotonic() + 1.5
    try:
        while time.monotonic() < stop:
            sum(i * i for i in range(1000))
        assert Lease(tmp_path / "shard", holder(), 0.4).acquire() is not None
    finally:
        beat.stop()
    assert threading.active_count() >= 1
