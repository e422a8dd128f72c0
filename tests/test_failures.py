"""A broken image (fp16 overflow: NaN or all black) is recorded as failed with its reason, never saved; the rerun
retries it."""

from pathlib import Path

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
    assert all(r["image_path"] is None for r in rows.values())
    assert not list(Path(cfg.output_dir, "images").rglob("*.png"))

    monkeypatch.setattr(AutoencoderKL, "decode", original)
    assert run(cfg) == 0  # failed rows are missing images: the rerun renders them
    assert [r["status"] for r in read_ledgers(cfg.output_dir)] == ["ok", "ok"]
