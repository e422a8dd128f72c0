"""The Kubernetes Indexed Job manifest: the fields that make retries and preemption safe, and a command the CLI accepts."""

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sdbatch.workers import resolve_worker, shards_for

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "scripts" / "k8s" / "indexed-job.yaml"


def load_job():
    return yaml.safe_load(JOB.read_text())


def container(job):
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def test_indexed_job_fields():
    job = load_job()
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 3
    assert 0 <= spec["maxFailedIndexes"] <= spec["completions"]
    assert spec["podReplacementPolicy"] == "Failed"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 1

    rules = spec["podFailurePolicy"]["rules"]
    ignore = [r for r in rules if r["action"] == "Ignore"]
    assert any(c["type"] == "DisruptionTarget" for r in ignore for c in r.get("onPodConditions", []))
    fail_index = [r for r in rules if r["action"] == "FailIndex"]
    assert any(r["onExitCodes"]["operator"] == "In" and 2 in r["onExitCodes"]["values"]
               and r["onExitCodes"].get("containerName", container(job)["name"]) == container(job)["name"]
               for r in fail_index)


def test_grace_period_outlasts_stop_timeout():
    job = load_job()
    cfg = compose_command(container(job)["command"])
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.stop_timeout_s


def test_volume_holds_manifest_and_output():
    job = load_job()
    pod = job["spec"]["template"]["spec"]
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = [m for m in container(job)["volumeMounts"] if m["name"] in claims]
    assert mounts
    cfg = compose_command(container(job)["command"])
    for path in (cfg.prompts, cfg.output_dir):
        assert any(Path(path).is_relative_to(m["mountPath"]) for m in mounts), path


def compose_command(command):
    assert command[:3] == ["python", "-m", "sdbatch"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "sdbatch" / "conf"), version_base=None):
        return compose("config", overrides=command[3:])


def test_cli_accepts_command_and_worker_count_matches():
    job = load_job()
    cfg = compose_command(container(job)["command"])
    assert cfg.num_workers == job["spec"]["completions"]
    # The pod's index comes from JOB_COMPLETION_INDEX, never from the command.
    assert cfg.worker_index is None


def test_completion_index_picks_its_shards():
    job = load_job()
    cfg = compose_command(container(job)["command"])
    worker = resolve_worker(cfg.worker_index, cfg.num_workers, {"JOB_COMPLETION_INDEX": "2"})
    assert (worker.index, worker.count) == (2, 4)
    assert shards_for(worker, 10) == [2, 6]
    every = sorted(s for i in range(4)
                   for s in shards_for(resolve_worker(None, 4, {"JOB_COMPLETION_INDEX": str(i)}), 10))
    assert every == list(range(10))
