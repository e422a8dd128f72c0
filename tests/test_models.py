"""Real weights through from_pretrained: a diffusers folder of safetensors renders; pickle weights are refused."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli, compose_config, read_ledgers, write_manifest
from sdbatch.models import tiny_model
from sdbatch.render import make_scheduler
from sdbatch.run import run


def save_diffusers_folder(folder, family: str, safe: bool = True):
    """The tiny model saved in the layout of a diffusers model repository (what snapshot_download gives)."""
    model = tiny_model(family)
    model.unet.save_pretrained(folder / "unet", safe_serialization=safe)
    model.vae.save_pretrained(folder / "vae", safe_serialization=safe)
    suffixes = ["", "_2"] if family == "sdxl" else [""]
    for suffix, encoder, tokenizer in zip(suffixes, model.text_encoders, model.tokenizers):
        encoder.save_pretrained(folder / f"text_encoder{suffix}", safe_serialization=safe)
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
    make_scheduler(compose_config().scheduler, model.scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def pixels(output_dir) -> dict:
    return {(r["id"], r["image_index"]): np.asarray(Image.open(output_dir / r["image_path"]), np.int16)
            for r in read_ledgers(output_dir)}


@pytest.mark.parametrize("model_name, family", [("sd15", "sd"), ("sdxl", "sdxl")])
def test_pretrained_folder_renders_like_the_same_weights_in_memory(tmp_path, model_name, family):
    weights = save_diffusers_folder(tmp_path / "weights", family)
    assert list((weights / "unet").glob("*.safetensors"))
    write_manifest(tmp_path / "catalog.parquet", {"id": ["a", "b"], "prompt": ["a red cat", "a blue dog"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", f"model={model_name}",
                 f"model.path={weights}", "width=64", "height=64", "steps=2")
    assert result.returncode == 0, result.stderr
    assert "2 images rendered (0 failed)" in result.stdout
    rows = read_ledgers(tmp_path / "out")
    assert [r["model"] for r in rows] == [model_name] * 2 and all(r["status"] == "ok" for r in rows)

    # the same weights built in memory (model=tiny) give the same pixels: loading lost nothing
    assert run(compose_config("model=tiny", f"model.family={family}", "steps=2", "progress=false",
                              f"prompts={tmp_path / 'catalog.parquet'}", f"output_dir={tmp_path / 'ref'}")) == 0
    loaded, reference = pixels(tmp_path / "out"), pixels(tmp_path / "ref")
    assert loaded.keys() == reference.keys()
    for key in loaded:
        assert np.abs(loaded[key] - reference[key]).max() <= 1, key


def test_pickle_weights_are_refused(tmp_path):
    weights = save_diffusers_folder(tmp_path / "weights", "sd", safe=False)
    unet_files = [p.suffix for p in (weights / "unet").iterdir()]
    assert ".bin" in unet_files and ".safetensors" not in unet_files  # (transformers may still save safetensors)
    write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat"]})
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=out", "model=sd15", f"model.path={weights}",
                 "width=64", "height=64")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "pickle" in result.stderr and "safetensors" in result.stderr and str(weights / "unet") in result.stderr
    assert not (tmp_path / "out").exists()
