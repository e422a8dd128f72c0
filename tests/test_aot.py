"""compile=true's ahead-of-time packages (GPU): compiled once, loaded by every later process, rebuilt when damaged."""

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = {"id": ["a", "b", "c"], "prompt": ["a red vase", "a blue mug", "a green lamp"]}
RUN = ["prompts=catalog.parquet", "model=tiny", "steps=3", "batch_size=2", "progress=false", "device=cuda",
       "compile_cache=cache"]


def pixels(folder, read_ledgers) -> dict:
    rows = read_ledgers(folder)
    assert [r["status"] for r in rows] == ["ok"] * len(PROMPTS["id"])
    return {r["id"]: np.asarray(Image.open(folder / r["image_path"]), np.int16) for r in rows}


def test_a_new_process_loads_the_compiled_packages_and_renders_the_same_pixels(tmp_path, cli, write_manifest,
                                                                              read_ledgers):
    write_manifest(tmp_path / "catalog.parquet", PROMPTS)
    cold = cli(tmp_path, *RUN, "output_dir=cold", "compile=true", timeout=900)
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert cold.stderr.count("ahead of time for") == 2, cold.stderr  # the UNet and the VAE decoder, one shape each
    packages = sorted((tmp_path / "cache" / "aot").glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["unet", "vae"], packages

    warm = cli(tmp_path, *RUN, "output_dir=warm", "compile=true")
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert "ahead of time" not in warm.stderr and "torch.compile" not in warm.stderr, warm.stderr
    eager = cli(tmp_path, *RUN, "output_dir=eager")
    assert eager.returncode == 0, eager.stderr[-3000:]
    first, again, plain = (pixels(tmp_path / f, read_ledgers) for f in ("cold", "warm", "eager"))
    for key in first:
        assert np.array_equal(first[key], again[key]), key
        assert np.abs(first[key] - plain[key]).max() <= 4, key  # compiled kernels round differently from eager

    packages[0].write_bytes(packages[0].read_bytes()[:1000])  # a package torn by a full disk, say
    damaged = cli(tmp_path, *RUN, "output_dir=damaged", "compile=true", timeout=900)
    assert damaged.returncode == 0, damaged.stderr[-3000:]
    assert "could not be loaded" in damaged.stderr and damaged.stderr.count("ahead of time for") == 1, damaged.stderr
    rebuilt = pixels(tmp_path / "damaged", read_ledgers)
    assert all(np.array_equal(first[key], rebuilt[key]) for key in first)
