"""Faults and awkward inputs through the real command line: a full disk, unusable output folders, prune's limits,
passthrough columns of every type, null ids, Ctrl-C with several processes, and what the summary says."""

import decimal
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import cli, read_ledgers, write_manifest
from test_crash import _stop_leftover_processes  # noqa: F401  (stops this module's workers too)
from test_crash import Run, images_on_disk, live_leases, wait_for

FAST = ["model=tiny", "steps=2", "progress=false"]


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sdbatch: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def full_disk_after(tmp_path: Path, files: int) -> dict:
    """An environment whose python fails every file creation under out/ after the first `files` with ENOSPC."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import errno, os, tempfile
        _mkstemp, _made = tempfile.mkstemp, [0]
        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.abspath(dir).startswith("{tmp_path / 'out'}"):
                _made[0] += 1
                if _made[0] > {files}:
                    raise OSError(errno.ENOSPC, "No space left on device", str(dir))
            return _mkstemp(*args, dir=dir, **kwargs)
        tempfile.mkstemp = mkstemp
    """))
    return {"PYTHONPATH": os.pathsep.join([str(hooks), str(Path(__file__).resolve().parents[1])])}


def test_a_full_disk_mid_run_records_what_was_written_exits_2_and_the_rerun_finishes(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"id": [f"r{i}" for i in range(12)],
                                                  "prompt": [f"product {i}" for i in range(12)]})
    args = ["prompts=catalog.parquet", "output_dir=out", *FAST, "batch_size=2", "shard_size=4"]
    result = cli(tmp_path, *args, env=full_disk_after(tmp_path, 5))
    message = one_error_line(result)
    assert "No space left on device" in message and "rerun" in message
    out = tmp_path / "out"
    recorded = {r["image_path"] for r in read_ledgers(out) if r["status"] == "ok"}
    assert recorded <= images_on_disk(out)  # every recorded image is there
    assert not live_leases(out)  # the failed worker let its shards go
    rerun = cli(tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr
    rows = read_ledgers(out)
    assert sorted(r["id"] for r in rows) == sorted(f"r{i}" for i in range(12))
    assert {r["image_path"] for r in rows} == images_on_disk(out)


@pytest.mark.parametrize("where", ["out", "parent/out"])
def test_an_output_dir_that_is_a_file_is_refused_before_anything_else(tmp_path, where):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat"]})
    (tmp_path / where.split("/")[0]).write_text("a file, not a folder")
    message = one_error_line(cli(tmp_path, "prompts=catalog.parquet", f"output_dir={where}", *FAST))
    assert "is a file, not a folder" in message and where.split("/")[0] in message


def test_prune_deletes_only_images_sdbatch_wrote_inside_output_dir(tmp_path):
    ids = ["keep", "removed", "skip-me", "outside"]  # shards 0, 2, 1 and 3 of 4
    write_manifest(tmp_path / "day1.parquet", {"id": ids, "prompt": ["a cat", "a dog", "a hat", "a mug"]})
    assert cli(tmp_path, "prompts=day1.parquet", "output_dir=out", *FAST, "shard_size=1").returncode == 0
    out = tmp_path / "out"
    paths = {r["id"]: out / r["image_path"] for r in read_ledgers(out)}
    assert len({p.parent for p in paths.values()}) == 4
    foreign = paths["removed"].parent / "holiday-photo.png"
    foreign.write_bytes(paths["keep"].read_bytes())  # a file sdbatch did not write: no name of ours
    lookalike = paths["removed"].parent / "x-0123456789ab_0.png"
    lookalike.write_bytes(b"\x89PNG not ours")  # our name pattern, but no provenance in it
    photos = tmp_path / "photos"
    paths["outside"].parent.rename(photos)  # the shard folder becomes a link to a folder outside output_dir
    os.symlink(photos, paths["outside"].parent)
    write_manifest(tmp_path / "day2.parquet", {"id": ["keep", "skip-me"], "prompt": ["a cat", ""]})
    result = cli(tmp_path, "prompts=day2.parquet", "output_dir=out", *FAST, "shard_size=1", "prune=true",
                 "on_invalid=skip")
    assert result.returncode == 0, result.stderr
    assert not paths["removed"].exists()  # left the manifest: pruned
    assert paths["keep"].exists() and foreign.exists() and lookalike.exists()
    assert paths["skip-me"].exists()  # still in the manifest, only invalid today: not pruned
    assert (photos / paths["outside"].name).exists()  # never deleted through a link
    assert "not pruning" in result.stderr and "symbolic link" in result.stderr
    assert "1 invalid row(s) recorded as skipped (skip-me)" in result.stdout


def test_passthrough_columns_keep_their_types_through_adoption_and_the_report(tmp_path):
    columns = {
        "id": ["a", "b", "c"], "prompt": ["a red cat", "a blue dog", "a green bird"],
        "huge": pa.array([2**64 - 1, 2**63, None], pa.uint64()),
        "added": pa.array([datetime(2026, 11, 1, tzinfo=timezone.utc)] * 3, pa.timestamp("ms", tz="UTC")),
        "day": pa.array([date(2026, 11, 1)] * 3, pa.date32()),
        "price": pa.array([decimal.Decimal("19.99")] * 3, pa.decimal128(10, 2)),
        "blob": pa.array([b"\x00\xff", b"", None], pa.binary()),
    }
    manifest = write_manifest(tmp_path / "catalog.parquet", columns)
    assert cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST).returncode == 0
    out = tmp_path / "out"
    for ledger in (out / "ledger").glob("*.parquet"):
        ledger.unlink()  # as if a kill -9 had come before any ledger was written: the rerun adopts the images
    (out / "plans").rename(tmp_path / "old-plans")
    columns["huge"] = pa.array([1, 2, 3], pa.uint64())  # today's values, not those the images remember
    write_manifest(manifest, columns)
    rerun = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 recovered from an earlier run" in rerun.stdout
    table = pq.read_table(next((out / "ledger").glob("*.parquet")))
    schema = pq.read_schema(manifest)
    for name in ("huge", "added", "day", "price", "blob"):
        assert table.schema.field(name).type == schema.field(name).type, name
    assert sorted(table.column("huge").to_pylist()) == [1, 2, 3]
    report = subprocess.run([sys.executable, "-m", "sdbatch.report", f"output_dir={out}"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert report.returncode == 0, report.stderr


def test_a_null_id_never_takes_the_name_of_a_real_id(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"id": ["row 1", None], "prompt": ["a cat", "a dog"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST, "on_invalid=skip")
    assert result.returncode == 0, result.stderr
    rows = read_ledgers(tmp_path / "out")
    assert [(r["id"], r["status"]) for r in rows if r["status"] == "ok"] == [("row 1", "ok")]
    (skipped,) = [r for r in rows if r["status"] == "skipped"]
    assert skipped["id"] is None and skipped["reason"] == "null id (manifest row 1)"
    assert "1 invalid row(s) recorded as skipped" in result.stdout


def test_what_the_user_is_told_about_columns_and_shards(tmp_path):
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a cat", "a dog"], "seeds": [1, 2]})
    first = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST, "shard_size=1")
    assert first.returncode == 0, first.stderr
    assert "column 'seeds' is not one sdbatch reads (did you mean 'seed'?)" in first.stderr
    second = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", *FAST, "shard_size=5", "overwrite=true",
                 "steps=3")
    assert second.returncode == 0, second.stderr
    assert "shard_size=5 is ignored" in second.stderr and "2 shards fixed at its first run" in second.stderr


def test_ctrl_c_stops_every_process_and_exits_130_without_a_traceback(tmp_path):
    manifest = write_manifest(tmp_path / "catalog.parquet", {"id": [f"r{i:02d}" for i in range(40)],
                                                            "prompt": [f"product {i}" for i in range(40)]})
    out = tmp_path / "out"
    run = Run(tmp_path, manifest, out, "processes=2", "stop_timeout_s=30")
    run.wait_started(count=2)
    wait_for(lambda: len(images_on_disk(out)) >= 2, 120)
    run.proc.send_signal(signal.SIGINT)  # the launcher forwards it to both workers
    assert run.wait() == 130, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout.count("interrupted: rerun the same command to continue (exit code 130)") == 2, run.stdout
    recorded = {r["image_path"] for r in read_ledgers(out)}
    assert recorded == images_on_disk(out) and not live_leases(out)


def test_help_and_settings_errors_need_no_model(tmp_path):
    """The quick path: a settings mistake is refused in one paragraph without rendering anything."""
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "guidance_scale=nan")
    assert "guidance_scale" in one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_workers_sharing_the_attention_timings_file_never_see_half_of_it(tmp_path, monkeypatch):
    """The workers of one machine time attention at the same moment and share one timings file: every save is
    whole, so a worker starting meanwhile never reads a torn file (one an older sdbatch left torn is timed again)."""
    import torch
    from sdbatch.attention import TimingCache
    monkeypatch.setenv("SDBATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")

    def save_and_read():
        for i in range(300):
            cache = TimingCache("cuda", torch.float16)
            cache.entries[f"{os.getpid()} {i}"] = 1.0
            cache.save()
            json.loads(cache.path.read_text())  # what the next worker to start reads

    save_and_read()  # imports what TimingCache needs once, before the workers fork
    workers = [multiprocessing.get_context("fork").Process(target=save_and_read) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * 4

    (tmp_path / "attention-timings.json").write_text('{"a GPU|torch')
    assert TimingCache("cuda", torch.float16).entries == {}


def test_timings_a_worker_saved_are_the_ones_every_later_worker_chooses_by(tmp_path, monkeypatch):
    """A run's workers share their attention timings in its cache folder, and timings on disk are never replaced:
    a worker that timed a shape at the same moment (slower, by noise) does not overwrite them, so every worker
    that starts later, on any machine, makes the same choice (the same kernels, the same compiled graph)."""
    import torch
    from sdbatch import attention
    monkeypatch.delenv("SDBATCH_CACHE", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    shared = tmp_path / "out" / ".cache" / "torch" / attention.TIMINGS_FILE
    flash, cudnn, shape = ("sdpa", {"kernel": "flash"}), ("sdpa", {"kernel": "cudnn"}), (64, 4096, 4096, 8, 40)

    def timed(cache, flash_ms):  # what this worker's GPU measures
        monkeypatch.setattr(attention, "time_variant", lambda variant, *_: flash_ms if variant == flash else 1.0)
        return [cache.time(variant, shape) for variant in (flash, cudnn)]

    first = attention.TimingCache("cuda", torch.float16, shared)
    concurrent = attention.TimingCache("cuda", torch.float16, shared)  # started before the first one saved
    assert timed(first, 0.9) == [0.9, 1.0]
    first.save()
    assert timed(concurrent, 1.1) == [1.1, 1.0]
    concurrent.save()
    assert timed(attention.TimingCache("cuda", torch.float16, shared), 5.0) == [0.9, 1.0]


def test_choosing_attention_keeps_the_kernel_warnings_torch_raises_on_purpose_out_of_the_log(monkeypatch):
    """sdbatch tries kernels that may not run a shape; torch warns from C++ for each ("Flash attention has been
    runtime disabled", "head_dim should be a multiple of 8"), and Python files those under the calling module,
    sdbatch.attention. They stay out of the log while sdbatch chooses, and still show for a kernel asked outside."""
    import warnings
    import torch
    from omegaconf import OmegaConf
    from sdbatch import attention
    real = attention.F.scaled_dot_product_attention

    def warning_sdpa(*args, **kwargs):
        warnings.warn("Flash attention has been runtime disabled.", UserWarning, stacklevel=2)  # as torch's C++ does
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", warning_sdpa)
    q = torch.randn(1, 8, 2, 8)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        attention.sdpa(q, q, q)
        assert [str(w.message) for w in shown] == ["Flash attention has been runtime disabled."]
        auto = OmegaConf.create({"name": "auto"})
        choice = attention.choose(auto, None, torch.device("cpu"), torch.float32, 2, 64, 64)
    assert choice.label == "sdpa" and len(shown) == 1, [str(w.message) for w in shown]


@pytest.fixture
def flash3_build(tmp_path, monkeypatch):
    """Installs a flash_attn_3 package as flash-attention's setup.py does: the config of what the build left out
    lies beside it (sdbatch reads that config only; the kernels themselves need a Hopper GPU)."""
    from sdbatch import attention

    def install(widths, **flags) -> None:
        left_out = {f"FLASHATTENTION_DISABLE_HDIM{w}": w not in widths for w in (64, 96, 128, 192, 256)}
        left_out |= {"FLASHATTENTION_DISABLE_FP16": False, "FLASHATTENTION_DISABLE_SM8x": False} | flags
        (tmp_path / "flash_attn_3").mkdir()
        (tmp_path / "flash_attn_3" / "__init__.py").write_text("")
        (tmp_path / "flash_attn_config.py").write_text(f"CONFIG = {{'build_flags': {left_out!r}}}\n")
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    sys.modules.pop("flash_attn_config", None)
    attention._flash3_build.cache_clear()


def test_flash3_is_timed_only_where_installed_and_kept_off_heads_its_build_lacks(flash3_build):
    """FlashAttention-3 kills the process (a segfault, seen on an H100) on a head width, dtype or GPU its build
    left out, so sdbatch refuses those calls itself, as an error the per-shape choice passes over."""
    import torch
    from sdbatch import attention
    auto = ("xformers", {"op": "auto"})
    assert attention.candidates(*auto) == [("xformers", {"op": "cutlass"}), ("xformers", {"op": "flash"})]
    flash3_build(widths=(64, 96, 192), FLASHATTENTION_DISABLE_FP16=True)
    assert ("xformers", {"op": "flash3"}) in attention.candidates(*auto)
    with pytest.raises(ValueError, match="head widths up to 192, not 256"):
        attention._check_flash3(torch.zeros(1, 8, 2, 256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="no fp16 kernels"):
        attention._check_flash3(torch.zeros(1, 8, 2, 160, dtype=torch.float16))
    attention._check_flash3(torch.zeros(1, 8, 2, 160, dtype=torch.bfloat16))  # padded to 192: runs


def test_attention_through_xformers_compiles_to_one_graph(flash3_build, monkeypatch):
    """A graph break at attention splits a compiled UNet into pieces (a break in the flash3 check made a compiled
    SD1.5 step 24% slower on an H100), so the xformers call, that check included, traces whole. xformers has no
    CPU kernel: its entry point is stood in for by SDPA, which the compiled function must then reproduce."""
    import torch
    import xformers.ops
    from sdbatch import attention
    flash3_build(widths=(64,))
    monkeypatch.setattr(attention, "XFORMERS_CHECKED", set())  # the stand-in's inputs stay out of the real record
    monkeypatch.setattr(xformers.ops, "memory_efficient_attention_forward",
                        lambda q, k, v, op: attention.sdpa(q, k, v))
    q = torch.randn(2, 64, 8, 40)
    try:
        for op in attention.XFORMERS_OPS:
            torch._dynamo.reset()
            attend = torch.compile(lambda q: attention.xformers(q, q * 2, q, {"op": op}), fullgraph=True)
            assert torch.allclose(attend(q), attention.sdpa(q, q * 2, q), atol=1e-5), op
    finally:
        torch._dynamo.reset()


COMPILE_ONE_FUNCTION = """
import sys, torch
from pathlib import Path
from sdbatch import job  # imports diffusers, which imports torch._dynamo: torch points its cache at /tmp then
job.point_compile_caches(Path(sys.argv[1]))
torch.compile(lambda x: torch.sin(x) * 2)(torch.randn(8))
"""


def test_the_compile_cache_lands_in_the_runs_folder_unless_the_user_chose_one(tmp_path):
    """Array tasks on other hosts and later nights reuse the compile cache only if it is in the run's folder, not
    in the /tmp default torch sets on import; a TORCHINDUCTOR_CACHE_DIR the user set is theirs to keep."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    runs = {"default": env, "user's": {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}}
    started = {name: subprocess.Popen([sys.executable, "-c", COMPILE_ONE_FUNCTION, str(tmp_path / name)], env=run_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, run_env in runs.items()}  # side by side: each is mostly imports and one C++ compile
    for name, process in started.items():
        _, stderr = process.communicate()
        assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
    assert list((tmp_path / "default" / "inductor").rglob("*.py")), "Inductor wrote its code outside the run's folder"
    assert list((tmp_path / "mine").rglob("*.py")) and not (tmp_path / "user's" / "inductor").exists()
