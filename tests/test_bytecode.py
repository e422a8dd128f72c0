"""Python's bytecode in the run's cache folder where the environment ships none (a container image built with
PYTHONDONTWRITEBYTECODE=1): the first process writes it, every later one reads it, and processes that start
together never break each other's imports."""

import importlib.util
import marshal
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import with_repo

MODULES = 40
IMPORT = ("import sys; from pathlib import Path; from sdbatch.run import keep_bytecode; "
          "keep_bytecode(Path(sys.argv[1]), 'heavy'); print('importing', flush=True); import heavy; "
          "print(heavy.total(), sys.pycache_prefix)")


def heavy_package(site: Path, seconds_each: float = 0) -> Path:
    """A package of many modules, none with bytecode beside it, like torch in such an image; each module may take
    a while to run, which spreads the bytecode writes over the import."""
    package = site / "heavy"
    package.mkdir(parents=True)
    for i in range(MODULES):
        (package / f"part{i}.py").write_text(f"import time\ntime.sleep({seconds_each})\nVALUE = {i}\n"
                                             + "".join(f"def f{j}(): return {j}\n" for j in range(50)))
    parts = ", ".join(f"part{i}" for i in range(MODULES))
    (package / "__init__.py").write_text(f"from heavy import {parts}\n\n"
                                         f"def total():\n    return sum(part.VALUE for part in ({parts}))\n")
    return package


def import_heavy(site: Path, cache: Path, *flags: str, env: dict | None = None, start=subprocess.run):
    """A new process that keeps bytecode in cache and imports the package; run to its end, or started (Popen)."""
    full_env = {name: value for name, value in os.environ.items() if name != "PYTHONPYCACHEPREFIX"}
    full_env.update(PYTHONPATH=os.pathsep.join([str(site), with_repo()]), PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    timeout = {"timeout": 120} if start is subprocess.run else {}
    return start([sys.executable, *flags, "-c", IMPORT, str(cache)], env=full_env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True, **timeout)


def test_later_processes_read_the_bytecode_the_first_one_kept(tmp_path):
    package = heavy_package(tmp_path / "site")
    first = import_heavy(tmp_path / "site", tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["importing", str(sum(range(MODULES))), str(tmp_path / "cache" / "bytecode")]
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
        assert all(p.returncode == 0 and p.stdout.split()[1] == str(sum(range(MODULES))) for p in done), \
            [p.stderr[-500:] for p in done if p.returncode]
        after = import_heavy(tmp_path / "site", cache, "-v")
        assert after.returncode == 0, after.stderr
        assert sum(line.startswith("# code object from") and "heavy" in line
                   for line in after.stderr.splitlines()) == MODULES + 1
        assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".pyc"]  # no temporary file left


def test_processes_killed_while_writing_leave_only_whole_files(tmp_path):
    """A task can die at any instruction: eight processes importing into a new folder, all killed at one random
    moment of their imports, eight times; every file left is whole bytecode, and a later process imports right."""
    heavy_package(tmp_path / "site", seconds_each=0.01)
    timed = import_heavy(tmp_path / "site", tmp_path / "timed", start=subprocess.Popen)
    timed.stdout.readline()
    started = time.perf_counter()
    timed.communicate()
    import_s, rng = time.perf_counter() - started, random.Random(0)  # ~0.4 s here; as long as it takes elsewhere
    for round_ in range(8):
        cache = tmp_path / f"cache{round_}"
        racers = [import_heavy(tmp_path / "site", cache, start=subprocess.Popen) for _ in range(8)]
        for racer in racers:
            assert racer.stdout.readline().strip() == "importing"
        time.sleep(rng.uniform(0, import_s))
        for racer in racers:
            racer.kill()
        for racer in racers:
            racer.communicate()
        for pyc in cache.rglob("*.pyc"):
            data = pyc.read_bytes()
            assert data[:4] == importlib.util.MAGIC_NUMBER and marshal.loads(data[16:]), pyc
        after = import_heavy(tmp_path / "site", cache)
        assert after.returncode == 0 and after.stdout.split()[1] == str(sum(range(MODULES))), after.stderr


def test_an_environment_with_bytecode_or_the_users_own_folder_is_left_alone(tmp_path):
    package = heavy_package(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    shipped = import_heavy(tmp_path / "site", tmp_path / "cache")
    assert shipped.returncode == 0 and shipped.stdout.split()[2] == "None", shipped.stderr
    assert not (tmp_path / "cache").exists()

    for pyc in package.glob("__pycache__/*"):
        pyc.unlink()
    own = import_heavy(tmp_path / "site", tmp_path / "cache", env={"PYTHONPYCACHEPREFIX": str(tmp_path / "mine")})
    assert own.returncode == 0 and own.stdout.split()[2] == str(tmp_path / "mine"), own.stderr
    assert not (tmp_path / "cache").exists()


def test_a_run_keeps_bytecode_only_where_torch_has_none(tmp_path, cli, write_manifest):
    """Through the CLI, in this environment: torch with its bytecode (pip writes it) leaves Python's files where they
    are; torch without it gets its bytecode kept in the run's cache folder, and the log says so."""
    shipped = os.path.exists(importlib.util.find_spec("torch").cached)
    manifest = write_manifest(tmp_path / "p.parquet", {"prompt": ["a red chair"]})
    done = cli(tmp_path, f"prompts={manifest}", "model=tiny", "steps=2", "output_dir=out",
               env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    kept = tmp_path / "out" / ".cache" / "torch" / "bytecode"
    if shipped:
        assert not kept.exists() and "no Python bytecode" not in done.stderr
    else:
        assert list(kept.rglob("*.pyc")) and f"keeping it in {kept}" in done.stderr
