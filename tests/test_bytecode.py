"""Python's bytecode in the run's cache folder where the environment ships none (a container image built with
PYTHONDONTWRITEBYTECODE=1): the first process writes it, every later one reads it, and processes that start
together never break each other's imports."""

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import with_repo

MODULES = 40
IMPORT = ("import sys; from pathlib import Path; from sdbatch.run import keep_bytecode; "
          "keep_bytecode(Path(sys.argv[1]), 'heavy'); import heavy; print(heavy.total(), sys.pycache_prefix)")


def heavy_package(site: Path) -> Path:
    """A package of many modules, none with bytecode beside it, like torch in such an image."""
    package = site / "heavy"
    package.mkdir(parents=True)
    for i in range(MODULES):
        (package / f"part{i}.py").write_text(f"VALUE = {i}\n" + "".join(f"def f{j}(): return {j}\n" for j in range(50)))
    parts = ", ".join(f"part{i}" for i in range(MODULES))
    (package / "__init__.py").write_text(f"from heavy import {parts}\n\n"
                                         f"def total():\n    return sum(part.VALUE for part in ({parts}))\n")
    return package


def import_heavy(site: Path, cache: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {name: value for name, value in os.environ.items() if name != "PYTHONPYCACHEPREFIX"}
    full_env.update(PYTHONPATH=os.pathsep.join([str(site), with_repo()]), PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    return subprocess.run([sys.executable, *flags, "-c", IMPORT, str(cache)], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_later_processes_read_the_bytecode_the_first_one_kept(tmp_path):
    package = heavy_package(tmp_path / "site")
    first = import_heavy(tmp_path / "site", tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(sum(range(MODULES))), str(tmp_path / "cache" / "bytecode")]
    kept = sorted((tmp_path / "cache" / "bytecode").rglob("*.pyc"))
    assert len([p for p in kept if "heavy" in p.parts]) == MODULES + 1
    assert not (package / "__pycache__").exists()  # the image's own folders stay as they were

    later = import_heavy(tmp_path / "site", tmp_path / "cache", "-v")
    assert later.returncode == 0, later.stderr
    read = [line for line in later.stderr.splitlines() if line.startswith("# code object from") and "heavy" in line]
    assert len(read) == MODULES + 1, later.stderr[-2000:]


def test_processes_starting_together_share_an_empty_folder(tmp_path):
    """Eight processes at once on a new folder, five times: every import succeeds, and what they left is whole."""
    heavy_package(tmp_path / "site")
    for round_ in range(5):
        cache = tmp_path / f"cache{round_}"
        with ThreadPoolExecutor(8) as pool:
            done = list(pool.map(lambda _: import_heavy(tmp_path / "site", cache), range(8)))
        assert all(p.returncode == 0 and p.stdout.startswith(str(sum(range(MODULES)))) for p in done), \
            [p.stderr[-500:] for p in done if p.returncode]
        after = import_heavy(tmp_path / "site", cache, "-v")
        assert after.returncode == 0, after.stderr
        assert sum(line.startswith("# code object from") and "heavy" in line
                   for line in after.stderr.splitlines()) == MODULES + 1
        assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".pyc"]  # no temporary file left


def test_an_environment_with_bytecode_or_the_users_own_folder_is_left_alone(tmp_path):
    package = heavy_package(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    shipped = import_heavy(tmp_path / "site", tmp_path / "cache")
    assert shipped.returncode == 0 and shipped.stdout.split()[1] == "None", shipped.stderr
    assert not (tmp_path / "cache").exists()

    for pyc in package.glob("__pycache__/*"):
        pyc.unlink()
    own = import_heavy(tmp_path / "site", tmp_path / "cache", env={"PYTHONPYCACHEPREFIX": str(tmp_path / "mine")})
    assert own.returncode == 0 and own.stdout.split()[1] == str(tmp_path / "mine"), own.stderr
    assert not (tmp_path / "cache").exists()


def test_a_run_keeps_bytecode_only_where_torch_has_none(tmp_path, cli, write_manifest):
    """Through the CLI, in this environment: torch with its bytecode (pip writes it) leaves Python's files where they
    are; torch without it gets its bytecode kept in the run's cache folder, and the log says so."""
    torch_source = importlib.util.find_spec("torch").origin
    shipped = os.path.exists(importlib.util.cache_from_source(torch_source))
    manifest = write_manifest(tmp_path / "p.parquet", {"prompt": ["a red chair"]})
    done = cli(tmp_path, f"prompts={manifest}", "model=tiny", "steps=2", "output_dir=out",
               env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    kept = tmp_path / "out" / ".cache" / "torch" / "bytecode"
    if shipped:
        assert not kept.exists() and "no Python bytecode" not in done.stderr
    else:
        assert list(kept.rglob("*.pyc")) and f"keeping it in {kept}" in done.stderr
