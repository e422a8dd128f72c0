import threading
import time
from collections import Counter

import pytest

from conftest import write_manifest
from sdbatch import SdbatchError
from sdbatch.lease import Heartbeat, Holder, Lease
from sdbatch.manifest import Manifest
from sdbatch.plan import PLAN_FILE, num_shards_for, open_plan, plan_id, shard_of
from sdbatch.workers import Worker, local_worker, resolve_worker, shards_for, steal_order


def covers_each_shard_once(workers, num_shards):
    taken = Counter(shard for worker in workers for shard in shards_for(worker, num_shards))
    return taken == Counter(range(num_shards))


def slurm_env(task_id, first, last, step=None, count=None):
    env = {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(last)}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    if count is not None:
        env["SLURM_ARRAY_TASK_COUNT"] = str(count)
    return env


# --- the plan ------------------------------------------------------------------------------------
def test_a_worker_waiting_for_another_workers_plan_warms_up_meanwhile(tmp_path):
    manifest = Manifest(write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat", "a blue dog"]}))
    out, settings, lease_s = tmp_path / "out", {"model": "tiny"}, 4
    folder = out / "plans" / plan_id(manifest.fingerprint(), 1, settings)
    planner = Lease(out / "leases" / f"plan-{folder.name}", Holder.this_process("worker 0 of 2"), lease_s)
    assert planner.acquire() is None  # worker 0 is making the plan
    warmed, opened, beat = [], [], Heartbeat(lease_s)

    def worker_1():
        opened.append(open_plan(manifest, out, 1, settings, Holder.this_process("worker 1 of 2"), lease_s, beat,
                                lambda: warmed.append(time.monotonic())))

    waiter = threading.Thread(target=worker_1)
    waiter.start()
    try:
        deadline = time.monotonic() + 10
        while not warmed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert warmed and not opened and not (folder / PLAN_FILE).exists()  # warming while it waits
    finally:
        planner.release()  # worker 0 gives up: worker 1 makes the plan itself
        waiter.join(30)
        beat.stop()
    assert opened and (folder / PLAN_FILE).exists() and len(warmed) == 1
    again, beat = [], Heartbeat(lease_s)
    open_plan(manifest, out, 1, settings, Holder.this_process("worker 1 of 2"), lease_s, beat, lambda: again.append(1))
    beat.stop()
    assert again == []  # a plan made already: nothing new to render for sure, nothing warmed


# --- shards --------------------------------------------------------------------------------------


def test_shard_of_is_stable():
    # fixed values: a change here would move every existing image to another shard
    assert shard_of("a", 1000) == int.from_bytes(bytes.fromhex("ca978112ca1bbdca"), "big") % 1000
    assert [shard_of(f"id-{i}", 7) for i in range(20)] == [shard_of(f"id-{i}", 7) for i in range(20)]
    assert shard_of("any", 1) == 0


def test_shard_of_spreads_ids():
    counts = Counter(shard_of(f"sku/{i}", 10) for i in range(10_000))
    assert set(counts) == set(range(10))
    assert min(counts.values()) > 800


def test_num_shards_for():
    assert num_shards_for(0, 1000) == 1
    assert num_shards_for(1000, 1000) == 1
    assert num_shards_for(1001, 1000) == 2
    with pytest.raises(SdbatchError):
        num_shards_for(10, 0)


def test_shards_for():
    assert shards_for(Worker(1, 3, "explicit"), 8) == [1, 4, 7]
    assert shards_for(Worker(0, 1, "single"), 3) == [0, 1, 2]


def test_steal_order_takes_every_other_shard_from_the_back_of_each_owners_list():
    worker = Worker(0, 3, "explicit")
    order = steal_order(worker, 9)
    assert sorted(order) == [s for s in range(9) if s % 3 != 0]
    assert order[:2] == [7, 8]  # the last shard of workers 1 and 2 first: their owners start from the front
    assert steal_order(Worker(2, 3, "explicit"), 9)[:2] == [6, 7]  # owners taken in turn from the next one
    assert steal_order(Worker(0, 1, "single"), 5) == []


# --- resolve_worker ------------------------------------------------------------------------------


def test_single_by_default():
    assert resolve_worker(None, None, {}) == Worker(0, 1, "single")


def test_num_workers_alone_is_refused():
    with pytest.raises(SdbatchError, match="worker_index"):
        resolve_worker(None, 4, {})


def test_explicit():
    assert resolve_worker(2, 4, {}) == Worker(2, 4, "explicit")


def test_explicit_overrides_environment():
    env = {**slurm_env(3, 0, 3), "JOB_COMPLETION_INDEX": "1"}
    assert resolve_worker(1, 2, env) == Worker(1, 2, "explicit")


@pytest.mark.parametrize("index, count", [(2, None), (4, 4), (-1, 4), (0, 0)])
def test_bad_explicit(index, count):
    with pytest.raises(SdbatchError):
        resolve_worker(index, count, {})


def test_dense_slurm_array_covers_all_shards():
    workers = [resolve_worker(None, None, slurm_env(task, 0, 3)) for task in range(4)]
    assert [(w.index, w.count, w.source) for w in workers] == [(i, 4, "slurm") for i in range(4)]
    assert covers_each_shard_once(workers, 13)


def test_stepped_slurm_array_covers_all_shards():
    workers = [resolve_worker(None, None, slurm_env(task, 1, 7, step=2)) for task in (1, 3, 5, 7)]
    assert [(w.index, w.count) for w in workers] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert covers_each_shard_once(workers, 10)


def test_slurm_task_count_is_used():
    assert resolve_worker(None, None, slurm_env(5, 5, 9, count=3)) == Worker(0, 3, "slurm")


def test_slurm_with_matching_num_workers():
    assert resolve_worker(None, 4, slurm_env(2, 0, 3)) == Worker(2, 4, "slurm")


def test_slurm_disagreeing_num_workers():
    with pytest.raises(SdbatchError, match="num_workers"):
        resolve_worker(None, 5, slurm_env(2, 0, 3))


def test_sparse_slurm_id_off_the_array_is_refused():
    with pytest.raises(SdbatchError, match="SLURM_ARRAY_TASK_ID"):
        resolve_worker(None, None, slurm_env(10, 1, 10, count=3))


@pytest.mark.parametrize("variable", ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"])
def test_bad_slurm_numbers_name_the_variable(variable):
    env = {**slurm_env(1, 0, 3, step=1), variable: "x1"}
    with pytest.raises(SdbatchError, match=variable):
        resolve_worker(None, None, env)


def test_kubernetes_index():
    assert resolve_worker(None, 3, {"JOB_COMPLETION_INDEX": "2"}) == Worker(2, 3, "kubernetes")


def test_kubernetes_needs_num_workers():
    with pytest.raises(SdbatchError, match="completions"):
        resolve_worker(None, None, {"JOB_COMPLETION_INDEX": "0"})


def test_kubernetes_index_out_of_range():
    with pytest.raises(SdbatchError, match="JOB_COMPLETION_INDEX"):
        resolve_worker(None, 2, {"JOB_COMPLETION_INDEX": "2"})


def test_bad_kubernetes_number_names_the_variable():
    with pytest.raises(SdbatchError, match="JOB_COMPLETION_INDEX"):
        resolve_worker(None, 2, {"JOB_COMPLETION_INDEX": "one"})


# --- local workers -------------------------------------------------------------------------------


def test_local_worker():
    assert local_worker(Worker(1, 3, "slurm"), 1, 2) == Worker(3, 6, "slurm")


def test_local_workers_cover_all_shards_once():
    tasks = [Worker(i, 3, "kubernetes") for i in range(3)]
    workers = [local_worker(task, rank, 4) for task in tasks for rank in range(4)]
    assert sorted(w.index for w in workers) == list(range(12))
    assert covers_each_shard_once(workers, 50)
