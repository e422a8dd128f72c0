"""The command line and the shipped config: mistakes exit 2 before torch is imported, --help, the README, a wheel."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, cli, write_manifest
from sdbatch import SdbatchError, cli as sdbatch_cli, settings

HEAVY = ("torch", "diffusers", "transformers", "xformers")


@pytest.fixture
def no_torch(tmp_path) -> dict:
    """An environment in which importing torch, diffusers, transformers or xformers fails loudly: a command that
    answers without a traceback under it has not imported them."""
    poison = tmp_path / "poison"
    poison.mkdir()
    for name in HEAVY:
        (poison / f"{name}.py").write_text(f"raise ImportError('sdbatch imported {name} before checking settings')\n")
    return {"PYTHONPATH": os.pathsep.join([str(poison), str(REPO)])}


@pytest.fixture
def catalog(tmp_path) -> Path:
    return write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a cat"]})


def user_error(result, *needles: str) -> str:
    """Exit 2, exactly one `sdbatch: error:` line naming each needle, no traceback, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("sdbatch: error: ")]
    assert len(lines) == 1 and result.stderr.strip() == lines[0], result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


MISTAKES = {  # arguments -> words the one error line must hold
    "typo key": (["batchsize=4"], ["batchsize=4", "not an sdbatch setting", "did you mean batch_size?"]),
    "typo group": (["modle=sd15"], ["modle", "did you mean model?"]),
    "appended unknown key": (["+unknownkey=1"], ["+unknownkey=1", "unknownkey is not an sdbatch setting"]),
    "appended typo": (["+batchsize=4"], ["+batchsize=4", "did you mean batch_size?"]),
    "appended known key": (["+steps=3"], ["+steps=3", "write steps=3 without the +"]),
    "deleted key": (["~negative_prompt"], ["~negative_prompt", "cannot be removed"]),
    "unknown attention": (["attention=flash3"], ["attention=flash3", "options: auto, sdpa, vanilla, xformers"]),
    "unknown model": (["model=sd3"], ["model=sd3", "options: sd15, sd21, sdxl, tiny"]),
    "key of another option": (["attention.kernel=flash"], ["attention=auto has no setting kernel",
                                                            "attention=sdpa has it"]),
    "scheduler option without +": (["scheduler.options.use_karras_sigmas=true"],
                                   ["write +scheduler.options.use_karras_sigmas=true"]),
    "hydra key typo": (["hydra.run.dirr=x"], ["hydra.run.dirr", "did you mean hydra.run.dir"]),
    "sweep without -m": (["worker_index=0,1"], ["worker_index=0,1", "-m (--multirun)"]),
    "not key=value": (["batchsize"], ["batchsize", "key=value"]),
    "device=gpu": (["device=gpu"], ["device=gpu must be auto | cpu | cuda | cuda:N"]),
    "negative_prompt=null": (["negative_prompt=null"], ["negative_prompt=null must be text"]),
    "guidance_scale=nan": (["guidance_scale=nan"], ["guidance_scale=nan must be a finite number"]),
    "guidance_scale=inf": (["guidance_scale=inf"], ["guidance_scale=inf must be a finite number"]),
    "steps too many": (["steps=1200"], ["steps=1200", "scheduler=pndm", "at most 999"]),
    "steps too many, dpmpp on sdxl": (["model=sdxl", "model.random_weights=true", "scheduler=dpmpp", "steps=999"],
                                      ["steps=999", "at most 998"]),
    "several at once": (["device=gpu", "steps=0", "dtype=int8"], ["device=gpu", "steps=0", "dtype=int8"]),
    "a bad value in a sweep": (["-m", "worker_index=0,1", "num_workers=2", "steps=20,2000"],
                               ["steps=2000", "at most 999"]),
    "a key only one swept option has": (["-m", "attention=sdpa,xformers", "attention.kernel=flash"],
                                        ["attention=xformers has no setting kernel; attention=sdpa has it"]),
    "a swept Hydra setting": (["-m", "hydra.verbose=true,false"], ["hydra.verbose=true,false", "cannot be swept"]),
}


def test_an_option_after_the_settings(tmp_path, catalog, no_torch):
    result = cli(tmp_path, "prompts=catalog.parquet", "-m", "worker_index=0,1", env=no_torch)
    user_error(result, "unrecognized arguments: worker_index=0,1", "-m go before the key=value settings")


@pytest.mark.parametrize("case", list(MISTAKES))
def test_mistakes_exit_2_before_torch(tmp_path, catalog, no_torch, case):
    args, needles = MISTAKES[case]
    flags = [arg for arg in args if arg in ("-m", "--multirun")]  # Hydra takes options before the settings only
    result = cli(tmp_path, *flags, "prompts=catalog.parquet", "output_dir=out", *[a for a in args if a not in flags],
                 env=no_torch)
    user_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.parquet", "poison"]  # no out/, multirun/, .hydra/


def test_no_manifest(tmp_path, no_torch):
    user_error(cli(tmp_path, env=no_torch), "prompts is missing", "prompts=PATH")


def test_report_mistakes(tmp_path, no_torch):
    def report(*args):
        env = {**os.environ, **no_torch}
        return subprocess.run([sys.executable, "-m", "sdbatch.report", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    user_error(report("output_dir=out", "thumbsize=64"), "thumbsize=64", "did you mean thumb_size?")
    user_error(report("output_dir=out", "+extra=1"), "+extra=1", "not an sdbatch setting")
    user_error(report("output_dir=out", "merged=maybe", "max_thumbs=-1"), "merged=maybe must be true or false",
               "max_thumbs=-1 must be at least 0")
    user_error(report(), "output_dir is missing", "output_dir=DIR")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poison"]


# ---------------------------------------------------------------- what must still work
def test_overrides_that_are_fine():
    """Known keys, group options, `+scheduler.options.*`, hydra.* keys and a -m sweep pass the preflight."""
    sdbatch_cli.preflight("config", [
        "prompts=x", "model=sdxl", "model.path=/models/sdxl", "attention=sdpa", "attention.kernel=flash",
        "scheduler=euler", "+scheduler.options.use_karras_sigmas=true", "++steps=30", "device=cuda:1",
        "hydra.job.chdir=false", "hydra.verbose=true",
    ], False, None, settings.run_problems)
    sdbatch_cli.preflight("config", ["prompts=x", "worker_index=0,1,2", "num_workers=3", "model=glob(*)"],
                          True, None, settings.run_problems)


def test_slurm_launcher_sweep_passes_the_preflight():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    sdbatch_cli.preflight("config", ["hydra/launcher=slurm", "prompts=/shared/catalog.parquet", "output_dir=/shared/o",
                                     "num_workers=4", "worker_index=0,1,2,3", "hydra.launcher.partition=gpu"],
                          True, None, settings.run_problems)
    with pytest.raises(SdbatchError, match="hydra.launcher.partitionn=gpu.*did you mean hydra.launcher.partition"):
        sdbatch_cli.preflight("config", ["hydra/launcher=slurm", "prompts=x", "hydra.launcher.partitionn=gpu"],
                              True, None, settings.run_problems)


def test_slurm_launcher_without_the_plugin(tmp_path, catalog, no_torch):
    hidden = tmp_path / "hidden" / "hydra_plugins"  # a regular package hides the installed plugins' namespace
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("")
    env = {"PYTHONPATH": os.pathsep.join([str(hidden.parent), no_torch["PYTHONPATH"]])}
    result = cli(tmp_path, "-m", "hydra/launcher=slurm", "prompts=catalog.parquet", "worker_index=0,1",
                 "num_workers=2", env=env)
    user_error(result, "hydra/launcher=slurm needs the hydra-submitit-launcher plugin", "pip install 'sdbatch[slurm]'")


def test_config_dir_adds_options(tmp_path):
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "mine.yaml").write_text(
        "name: mine\nfamily: sd\npath: /models/mine\nrandom_weights: false\nwidth: 512\nheight: 512\n")
    sdbatch_cli.preflight("config", ["prompts=x", "model=mine"], False, str(tmp_path / "conf"), settings.run_problems)
    with pytest.raises(SdbatchError, match="model=mine: model has no option mine"):
        sdbatch_cli.preflight("config", ["prompts=x", "model=mine"], False, None, settings.run_problems)


def test_multirun_sweep_renders_one_worker_per_value(tmp_path, catalog):
    result = cli(tmp_path, "-m", "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=1",
                 "progress=false", "num_workers=2", "worker_index=0,1")
    assert result.returncode == 0, result.stderr
    assert "sdbatch worker 0/2" in result.stdout and "sdbatch worker 1/2" in result.stdout


# ---------------------------------------------------------------- --help, and the README from the same comments
def test_help_describes_every_key_and_group(tmp_path, no_torch):
    result = cli(tmp_path, "--help", env=no_torch)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    config = OmegaConf.load(CONF_DIR / "config.yaml")
    for key in set(config) - {"defaults", "hydra"}:
        assert re.search(rf"^  {key} +\S", text, re.M), key
    for group in ("model", "attention", "scheduler"):
        assert f"\n  {group}: " in text
        for option in (CONF_DIR / group).glob("*.yaml"):
            assert re.search(rf"^    [* ] {option.stem} +\S", text, re.M), option
    for key in ("model.path", "model.random_weights", "attention.kernel", "attention.op", "scheduler.options"):
        assert f"  {key}  " in text
    assert text.count("python -m sdbatch ") >= 3  # examples
    assert "-m (--multirun)" in text and "hydra/launcher=slurm" in text
    assert cli(tmp_path, "-h", env=no_torch).stdout == text


def test_report_help_describes_every_key(tmp_path, no_torch):
    env = {**os.environ, **no_torch}
    result = subprocess.run([sys.executable, "-m", "sdbatch.report", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for key in set(OmegaConf.load(CONF_DIR / "report.yaml")) - {"defaults", "hydra"}:
        assert re.search(rf"^  {key} +\S", result.stdout, re.M), key
    assert "python -m sdbatch.report output_dir=" in result.stdout


def markdown_table(config_name: str) -> str:
    """The README's settings table, as the yaml's comments give it."""
    _, keys, _ = sdbatch_cli.read_config(config_name)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in keys:
        shown = "*(required)*" if default == "???" else f"`{default}`"
        rows.append(f"| `{key}` | {shown} | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


@pytest.mark.parametrize("config_name", ["config", "report"])
def test_readme_tables_match_the_config(config_name):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = markdown_table(config_name)
    assert table in readme, f"README's table for {config_name}.yaml differs from its comments; it should be:\n{table}"


# ---------------------------------------------------------------- a wheel, installed elsewhere
def test_wheel_runs_outside_the_repository(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: no wheel can be built here")
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "sdbatch", source / "sdbatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "."],
                           cwd=source, capture_output=True, text=True, timeout=300)
    if built.returncode:
        pytest.skip(f"pip cannot build a wheel here: {built.stderr[-500:]}")
    wheel = next((tmp_path / "dist").glob("sdbatch-*.whl"))
    target = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {"PYTHONPATH": str(target)}  # the deps come from this interpreter's site-packages
    where = subprocess.run([sys.executable, "-c", "import sdbatch; print(sdbatch.__file__)"], cwd=run_dir,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(target), where
    assert not Path(sysconfig.get_paths()["purelib"], "sdbatch").exists()

    helped = cli(run_dir, "--help", env=env)
    assert helped.returncode == 0 and "prompts" in helped.stdout, helped.stderr
    write_manifest(run_dir / "catalog.parquet", {"prompt": ["a red cube", "a blue sphere"]})
    rendered = cli(run_dir, "prompts=catalog.parquet", "output_dir=out", "model=tiny", "steps=1", "progress=false",
                   env=env)
    assert rendered.returncode == 0, rendered.stderr
    assert "2 images rendered (0 failed)" in rendered.stdout
    assert len(list((run_dir / "out" / "images").rglob("*.png"))) == 2
