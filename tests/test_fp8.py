"""dtype=fp8: the UNet's transformer matmuls in FP8 with per-row scales (torch runs them on a CPU too, slowly)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_config
from sdbatch import fp8
from sdbatch.compare import psnr
from sdbatch.models import tiny_model
from sdbatch.run import run

PROMPTS = {"id": ["a", "b", "c", "d", "e"],
           "prompt": ["a red vase", "a blue mug", "a green lamp", "a black chair", "a white sneaker"]}


def images(output_dir, read_ledgers) -> dict:
    """id -> (content key, pixels, provenance) of every image in the folder."""
    result = {}
    for row in read_ledgers(output_dir):
        assert row["status"] == "ok"
        with Image.open(output_dir / row["image_path"]) as image:
            result[row["id"]] = (row["content_key"], np.asarray(image, np.float64), json.loads(image.text["sdbatch"]))
    return result


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


# a batch of 1 and one of 4 run different GEMM kernels (another accumulation order): on the GPU, where cuBLASLt
# picks them by shape, that moves a few pixels by up to 4 levels (3 measured on an H100)
@pytest.mark.parametrize("where, levels", [
    pytest.param(("device=cpu",), 2, id="cpu"),
    pytest.param(("device=cuda", "compile=true"), 4, id="gpu-compiled",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not FP8_GPU, reason="needs FP8 tensor cores")]),
])
def test_fp8_renders_close_to_fp16_under_its_own_content_key_whatever_the_batch(tmp_path, cli, write_manifest,
                                                                                read_ledgers, where, levels):
    path = write_manifest(tmp_path / "catalog.parquet", PROMPTS)
    result = cli(tmp_path, "prompts=catalog.parquet", "output_dir=fp8", "model=tiny", "steps=3", "dtype=fp8",
                 "batch_size=4", "progress=false", *where)
    assert result.returncode == 0, result.stderr
    for folder, overrides in (("fp16", ["dtype=fp16"]), ("fp8-batch1", ["dtype=fp8", "batch_size=1"])):
        assert run(compose_config("model=tiny", "steps=3", "progress=false", f"prompts={path}",
                                  f"output_dir={tmp_path / folder}", *where, *overrides)) == 0
    half, eight = images(tmp_path / "fp16", read_ledgers), images(tmp_path / "fp8", read_ledgers)
    alone = images(tmp_path / "fp8-batch1", read_ledgers)
    assert half.keys() == eight.keys() == alone.keys() == set(PROMPTS["id"])
    for key in half:
        assert half[key][0] != eight[key][0], "an fp8 image must not pass for the fp16 one"
        assert not np.array_equal(half[key][1], eight[key][1])
        assert psnr(half[key][1], eight[key][1]) > 35, key
        assert eight[key][2]["dtype"].startswith("fp8")
        # per-row scales: the rows an image shares its batch with do not change it
        assert eight[key][0] == alone[key][0] and np.abs(eight[key][1] - alone[key][1]).max() <= levels, key


def test_every_transformer_matmul_but_the_one_after_geglu_is_converted_and_nothing_else():
    unet = tiny_model("sd").unet
    linears = {name for name, module in unet.named_modules() if type(module) is torch.nn.Linear}
    after_geglu = {name for name in linears if name.endswith(".ff.net.2")}
    assert after_geglu and fp8.convert_unet(unet) == sum(".attentions." in name for name in linears) - len(after_geglu)
    left = {name for name, module in unet.named_modules() if type(module) is torch.nn.Linear}
    assert left - after_geglu and not any(".attentions." in name for name in left - after_geglu)  # time embedding: fp16
    assert after_geglu <= left


def test_a_gpu_without_fp8_tensor_cores_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    message = fp8.why_not(torch.device("cuda"))
    assert "NVIDIA A100-SXM4-80GB is 8.0" in message and "8.9" in message and "dtype=fp16" in message
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.why_not(torch.device("cuda")) is None


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_an_fp8_linear_stays_within_e4m3_rounding_of_the_fp16_one(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 128).half()
    x = torch.randn(2, rows, 64, dtype=torch.float16)
    exact = linear(x).float()
    approx = fp8.Fp8Linear(linear)(x)
    assert approx.shape == exact.shape and approx.dtype == torch.float16
    assert (approx.float() - exact).norm() / exact.norm() < 0.06  # e4m3 keeps 3 mantissa bits: about 3.5% here
