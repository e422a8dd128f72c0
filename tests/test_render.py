"""The denoising loop is diffusers' loop, and an image's pixels do not depend on who it shares a batch with."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import compose_config, read_ledgers, write_manifest
from sdbatch import attention
from sdbatch.manifest import ImageJob
from sdbatch.models import tiny_model
from sdbatch.render import Renderer, make_scheduler
from sdbatch.run import run

SCHEDULERS = ("pndm", "dpmpp", "euler")
JOBS = [("a red cat on a sofa", "", 42), ("a blue dog", "blurry, low quality", 7)]


# ---------------------------------------------------------------- equivalence with diffusers' pipelines
def diffusers_pipeline(model, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components = dict(unet=model.unet, vae=model.vae, text_encoder=model.text_encoders[0],
                      tokenizer=model.tokenizers[0], scheduler=scheduler)
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1],
                                         **components)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_same_pixels_as_diffusers_pipeline(family, scheduler_name):
    cfg = compose_config(f"scheduler={scheduler_name}", "attention=sdpa")
    scheduler_cfg = cfg.scheduler
    model = tiny_model(family)
    steps, scale, width, height = 4, 7.5, 64, 64
    # the backend as run.py sets it up (processor swapped into the UNet and VAE)
    attention.apply(model, attention.choose(cfg.attention, model, torch.device("cpu"), torch.float32, 2, width, height))
    jobs = [ImageJob(id=str(i), image_index=0, prompt=p, negative_prompt=n, seed=s, width=width, height=height,
                     steps=steps, guidance_scale=scale, extra={}) for i, (p, n, s) in enumerate(JOBS)]
    ours = Renderer(model, scheduler_cfg).render(jobs)
    assert ours.failures == [None, None]

    pipe = diffusers_pipeline(model, make_scheduler(scheduler_cfg, model.scheduler_config))
    for job, pixels in zip(jobs, ours.pixels):
        reference = pipe(job.prompt, negative_prompt=job.negative_prompt or None, num_inference_steps=steps,
                         guidance_scale=scale, width=width, height=height, output_type="np",
                         generator=[torch.Generator().manual_seed(job.seed)]).images[0]
        reference = (reference * 255).round().astype(np.int16)
        ours_px = pixels.numpy().astype(np.int16)
        assert ours_px.shape == reference.shape == (height, width, 3)
        assert np.abs(ours_px - reference).max() <= 1, f"{family}/{scheduler_name}: differs from diffusers"
        assert ours_px.std() > 1  # a real image, not a constant


# ---------------------------------------------------------------- batch, shard and worker independence
def independence_manifest(path):
    return write_manifest(path, {
        "id": ["r0", "r1", "r2", "r3", "r4", "r5", "r6"],
        "prompt": ["a red cat", "a blue dog", "a green bird", "a red cat", "a lamp", "a vase", "a mug"],
        "seed": pa.array([1, 2, None, 4, None, 6, 7], pa.int64()),
        "width": pa.array([None, None, None, 96, 96, None, 64], pa.int64()),
        "height": pa.array([None, None, None, 64, 64, None, 48], pa.int64()),
        "num_images": pa.array([2, None, None, None, 3, None, None], pa.int64()),
    })


def rendered(output_dir):
    """(id, image_index) -> (seed, content_key, pixels) of every image in the folder's ledger."""
    result = {}
    for row in read_ledgers(output_dir):
        assert row["status"] == "ok"
        with Image.open(output_dir / row["image_path"]) as image:
            result[(row["id"], row["image_index"])] = (row["seed"], row["content_key"], np.asarray(image, np.int16))
    return result


def assert_same_images(a, b, max_levels=2):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][:2] == b[key][:2], key  # identical seed and content key
        assert np.abs(a[key][2] - b[key][2]).max() <= max_levels, key


def test_pixels_do_not_depend_on_batch_shard_or_worker_count(tmp_path):
    path = independence_manifest(tmp_path / "catalog.parquet")

    def render(folder, *overrides):
        out = tmp_path / folder
        assert run(compose_config("model=tiny", "steps=2", "progress=false", f"prompts={path}",
                                  f"output_dir={out}", *overrides)) == 0
        return out

    reference = rendered(render("batch1", "batch_size=1"))
    assert len(reference) == 10
    assert_same_images(reference, rendered(render("batch4", "batch_size=4")))
    assert_same_images(reference, rendered(render("shard1", "shard_size=1", "batch_size=4")))
    assert_same_images(reference, rendered(render("shard100", "shard_size=100", "batch_size=3")))

    workers = render("workers", "shard_size=2", "worker_index=0", "num_workers=2")
    first_half = read_ledgers(workers)
    assert first_half and {r["worker_index"] for r in first_half} == {0}
    render("workers", "shard_size=2", "worker_index=1", "num_workers=2")
    rows = read_ledgers(workers)
    assert {r["worker_index"] for r in rows} == {0, 1} and {r["num_workers"] for r in rows} == {2}
    assert len(first_half) < len(rows)
    assert_same_images(reference, rendered(workers))
