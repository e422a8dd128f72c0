"""Shared fixtures: the real Hydra config (tiny model, 2 steps, tmp_path), manifests, ledgers, the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "sdbatch" / "conf"
TEST_OVERRIDES = ["model=tiny", "steps=2", "progress=false"]


# The longest files first: `-n 2 --dist loadfile` hands files out in collection order, so a long one collected last
# leaves the other worker idle until it ends.
LONGEST_FILES = {name: rank for rank, name in enumerate(
    ["test_crash.py", "test_slurm.py", "test_fleet.py", "test_hardening.py", "test_lora.py"])}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FILES.get(item.path.name, len(LONGEST_FILES)))


def compose_config(*overrides: str):
    """The shipped config/config.yaml with Hydra overrides applied, as `python -m sdbatch` would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg("prompts=...", "batch_size=4", ...): the real config at model=tiny steps=2, into tmp_path/out."""
    def make(*overrides: str):
        return compose_config(*TEST_OVERRIDES, f"output_dir={tmp_path / 'out'}", *overrides)
    return make


@pytest.fixture
def cfg(make_cfg, tmp_path):
    """The default test config on a two-row manifest at tmp_path/catalog.parquet."""
    path = write_manifest(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": ["a red cat", "a blue dog"]})
    return make_cfg(f"prompts={path}")


def write_manifest(path, columns, schema=None) -> Path:
    """Write a manifest: columns is {name: values} (or a list of row dicts)."""
    path = Path(path)
    table = pa.Table.from_pylist(columns, schema=schema) if isinstance(columns, list) else pa.table(columns, schema=schema)
    pq.write_table(table, path)
    return path


def write_hive_parts(folder, key: str, parts: dict) -> Path:
    """A manifest as Spark writes one: folder/KEY=VALUE/part-00000.parquet for each {VALUE: [ids]}, and _SUCCESS."""
    folder = Path(folder)
    for value, ids in parts.items():
        (folder / f"{key}={value}").mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "prompt": [f"product {i}" for i in ids]}),
                       folder / f"{key}={value}" / "part-00000.parquet")
    (folder / "_SUCCESS").write_text("")
    return folder


def read_ledgers(output_dir) -> list[dict]:
    """All rows of all shard ledgers, sorted by (id, image_index)."""
    rows = []
    for path in sorted(Path(output_dir, "ledger").glob("shard-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: (r["id"] or "", r["image_index"] if r["image_index"] is not None else -1))


def cli(cwd, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m sdbatch ARGS` in cwd, offline, as a user runs it; returns the finished process (text output)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
                "SDBATCH_CACHE": str(Path(cwd) / ".sdbatch-cache"), "PYTHONPATH": with_repo(), **(env or {})}
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SDBATCH_LOCAL_RANK", "SDBATCH_LOCAL_COUNT"):
        full_env.pop(name, None)  # a test run inside a Slurm job must still be one worker
    return subprocess.run([sys.executable, "-m", "sdbatch", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


def with_repo() -> str:
    """PYTHONPATH with this checkout first: a command run in a test's folder imports the sdbatch under test."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(name="write_manifest")
def write_manifest_fixture():
    return write_manifest


@pytest.fixture(name="read_ledgers")
def read_ledgers_fixture():
    return read_ledgers


@pytest.fixture(name="cli")
def cli_fixture():
    return cli


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    """In-process run(cfg) calls must not pick up a Slurm/Kubernetes worker index from the environment."""
    for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "SDBATCH_LOCAL_RANK", "SDBATCH_LOCAL_COUNT"):
        monkeypatch.delenv(name, raising=False)
