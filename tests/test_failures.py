"""A broken image (fp16 overflow: NaN or all black) is recorded as failed with its reason, never saved; the rerun
retries it."""

from pathlib import Path

import torch

from diffusers import AutoencoderKL

from conftest import read_ledgers
from sdbatch.run import run


def test_nan_and_black_images_are_flagged_failed_not_saved(cfg, monkeypatch):
    original = AutoencoderKL.decode

    def overflowing(self, z, *args, **kwargs):
        images = original(self, z, *args, **kwargs)[0].clone()
        images[0] = float("nan")  # first image of the batch: NaN
        images[1] = -1.0  # second: all black after (x / 2 + 0.5)
        return (images,)

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    assert run(cfg) == 0
    rows = {r["id"]: r for r in read_ledgers(cfg.output_dir)}
    assert rows["a"]["status"] == "failed" and "non-finite" in rows["a"]["reason"]
    assert rows["b"]["status"] == "failed" and "all-black" in rows["b"]["reason"]
    assert "fp16" not in rows["a"]["reason"] + rows["b"]["reason"]  # this run is fp32: no fp16 advice
    assert all(r["image_path"] is None for r in rows.values())
    assert not list(Path(cfg.output_dir, "images").rglob("*.png"))

    monkeypatch.setattr(AutoencoderKL, "decode", original)
    assert run(cfg) == 0  # failed rows are missing images: the rerun renders them
    assert [r["status"] for r in read_ledgers(cfg.output_dir)] == ["ok", "ok"]


def test_out_of_memory_halves_the_batch_and_records_it(cfg, make_cfg, tmp_path, monkeypatch):
    from conftest import write_manifest
    from sdbatch.render import Renderer
    manifest = write_manifest(tmp_path / "six.parquet", {"prompt": [f"item {i}" for i in range(6)]})
    original = Renderer._render

    def small_gpu(self, jobs):
        if len(jobs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, jobs)

    monkeypatch.setattr(Renderer, "_render", small_gpu)
    assert run(make_cfg(f"prompts={manifest}", "batch_size=6")) == 0
    rows = read_ledgers(cfg.output_dir)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok"}
    assert max(r["batch_size"] for r in rows) == 2  # the ledger shows the smaller batches that really ran


def test_xformers_built_for_another_torch_names_both_versions_and_the_fix():
    """Here xformers 0.0.35's wheel targets torch 2.10 while torch is 2.13: the H200's common real case."""
    from sdbatch.attention import _xformers_problem
    import xformers._cpp_lib as cpp
    if cpp._cpp_library_load_exception is None:
        import pytest
        pytest.skip("this xformers matches this torch")
    message = _xformers_problem(torch.device("cuda"))
    assert torch.__version__ in message and "2.10" in message
    assert "attention=sdpa" in message and "scripts/gpu/setup.sh" in message


def test_a_batch_that_raises_fails_its_images_and_the_run_goes_on(make_cfg, tmp_path, monkeypatch, capsys):
    from conftest import write_manifest
    from sdbatch.render import Renderer
    manifest = write_manifest(tmp_path / "four.parquet", {"id": ["a", "b", "c", "d"],
                                                          "prompt": ["fine", "EXPLODE", "fine too", "also fine"]})
    original = Renderer._render

    def fragile(self, jobs):
        if any(j.prompt == "EXPLODE" for j in jobs):
            raise RuntimeError("Expected more than 1 value per channel when training")
        return original(self, jobs)

    monkeypatch.setattr(Renderer, "_render", fragile)
    cfg = make_cfg(f"prompts={manifest}", "batch_size=1")
    assert run(cfg) == 0
    rows = {r["id"]: r for r in read_ledgers(cfg.output_dir)}
    assert rows["b"]["status"] == "failed" and rows["b"]["reason"].startswith("rendering failed: Expected more")
    assert {rows[i]["status"] for i in "acd"} == {"ok"}
    assert "1 failed" in capsys.readouterr().out
    monkeypatch.setattr(Renderer, "_render", original)
    assert run(cfg) == 0  # a new process retries the failed image
    assert {r["status"] for r in read_ledgers(cfg.output_dir)} == {"ok"}
