"""Which worker this process is (explicit settings, a Slurm array task, a Kubernetes indexed Job, one process per
GPU) and which shards it owns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdbatch import SdbatchError


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    source: str  # explicit | slurm | kubernetes | single


def shards_for(worker: Worker, num_shards: int) -> list[int]:
    """The shards this worker owns: it exits 0 only once they are all complete."""
    return list(range(worker.index, num_shards, worker.count))


def steal_order(worker: Worker, num_shards: int) -> list[int]:
    """Other workers' shards, in the order this worker helps with them once its own are done: the last shards of
    each owner's list first (owners work from the front), the owners taken in turn starting with the next one."""
    others = [s for s in range(num_shards) if s % worker.count != worker.index]
    return sorted(others, key=lambda s: (-(s // worker.count), (s % worker.count - worker.index) % worker.count))


def local_worker(task: Worker, local_rank: int, local_count: int) -> Worker:
    """One of local_count processes on this machine, as a worker of the whole job."""
    if not 0 <= local_rank < local_count:
        raise ValueError(f"local_rank {local_rank} is outside 0..{local_count - 1}")
    return Worker(task.index * local_count + local_rank, task.count * local_count, task.source)


def resolve_worker(worker_index: int | None, num_workers: int | None, env: Mapping[str, str]) -> Worker:
    """This worker: explicit settings, else a Slurm array task, else a Kubernetes indexed Job, else the only one."""
    if worker_index is not None:
        return _explicit_worker(worker_index, num_workers)
    if env.get("SLURM_ARRAY_TASK_ID"):
        return _slurm_worker(num_workers, env)
    if env.get("JOB_COMPLETION_INDEX"):
        return _kubernetes_worker(num_workers, env)
    if num_workers is not None:
        raise SdbatchError(
            f"num_workers={num_workers} was given without a worker index: set worker_index= too "
            "(0 to num_workers-1), or run as a Slurm array task or a Kubernetes indexed Job, "
            "which give each worker its index."
        )
    return Worker(0, 1, "single")


def _explicit_worker(worker_index: int, num_workers: int | None) -> Worker:
    if num_workers is None:
        raise SdbatchError(f"worker_index={worker_index} needs num_workers= too (the number of workers).")
    if num_workers < 1:
        raise SdbatchError(f"num_workers must be at least 1, not {num_workers}.")
    if not 0 <= worker_index < num_workers:
        raise SdbatchError(
            f"worker_index={worker_index} is outside 0..{num_workers - 1} (num_workers={num_workers})."
        )
    return Worker(worker_index, num_workers, "explicit")


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = env.get(name)
    if not text:
        if default is None:
            raise SdbatchError(f"{name} is not set, but sdbatch needs it to find this worker's index.")
        return default
    try:
        return int(text)
    except ValueError:
        raise SdbatchError(f"{name}={text!r} is not a whole number.") from None


def _slurm_worker(num_workers: int | None, env: Mapping[str, str]) -> Worker:
    # Task ids may start anywhere and be stepped (--array=1-7:2), so the index is the position in the array.
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", default=1)
    if step < 1:
        raise SdbatchError(f"SLURM_ARRAY_TASK_STEP={step} must be at least 1.")
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    else:
        count = (_env_int(env, "SLURM_ARRAY_TASK_MAX") - first) // step + 1
    index, off_step = divmod(task_id - first, step)
    if off_step or not 0 <= index < count:
        raise SdbatchError(
            f"SLURM_ARRAY_TASK_ID={task_id} is not one of {count} evenly stepped tasks from {first} by {step}: "
            "sdbatch needs an array like --array=0-3 or --array=1-7:2, "
            "or pass worker_index= and num_workers= yourself."
        )
    if num_workers is not None and num_workers != count:
        raise SdbatchError(
            f"num_workers={num_workers} disagrees with the Slurm array, which has {count} tasks: "
            "leave num_workers unset, or make it match the array."
        )
    return Worker(index, count, "slurm")


def _kubernetes_worker(num_workers: int | None, env: Mapping[str, str]) -> Worker:
    index = _env_int(env, "JOB_COMPLETION_INDEX")
    if num_workers is None:
        raise SdbatchError(
            f"JOB_COMPLETION_INDEX={index} is set (a Kubernetes indexed Job), but num_workers is not: "
            "set num_workers= to the Job's completions."
        )
    if num_workers < 1 or not 0 <= index < num_workers:
        raise SdbatchError(
            f"JOB_COMPLETION_INDEX={index} is outside 0..{num_workers - 1}: "
            f"set num_workers= to the Job's completions (now {num_workers})."
        )
    return Worker(index, num_workers, "kubernetes")
