"""The denoising loop is diffusers' loop, and an image's pixels do not depend on who it shares a batch with."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from conftest import compose_config, read_ledgers, write_manifest
from sdbatch import attention
from sdbatch.compare import psnr
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

    workers = render("workers", "shard_size=2", "worker_index=0", "num_workers=2", "steal=false")
    first_half = read_ledgers(workers)
    assert first_half and {r["worker_index"] for r in first_half} == {0}
    render("workers", "shard_size=2", "worker_index=1", "num_workers=2", "steal=false")
    rows = read_ledgers(workers)
    assert {r["worker_index"] for r in rows} == {0, 1} and {r["num_workers"] for r in rows} == {2}
    assert len(first_half) < len(rows)
    assert_same_images(reference, rendered(workers))


# ---------------------------------------------------------------- the VAE's precision
def test_vae_dtype_decodes_in_its_own_precision_close_to_the_default(tmp_path):
    path = write_manifest(tmp_path / "catalog.parquet", {"prompt": ["a red cat", "a blue dog", "a green bird"]})
    folders = {}
    for vae_dtype in ("auto", "bf16"):
        folders[vae_dtype] = tmp_path / vae_dtype
        assert run(compose_config("model=tiny", "steps=2", "progress=false", f"prompts={path}",
                                  f"output_dir={folders[vae_dtype]}", f"vae_dtype={vae_dtype}")) == 0
    default, bf16 = rendered(folders["auto"]), rendered(folders["bf16"])
    assert default.keys() == bf16.keys() and len(default) == 3
    for key in default:
        assert default[key][1] != bf16[key][1], "a bf16-decoded image must not pass for the fp32-decoded one"
        assert psnr(default[key][2], bf16[key][2]) > 35, key
    row = read_ledgers(folders["bf16"])[0]
    with Image.open(folders["bf16"] / row["image_path"]) as image:
        provenance = json.loads(image.text["sdbatch"])
    assert provenance["dtype"] == "float32" and provenance["vae_dtype"] == "bfloat16"


def test_an_fp16_sdxl_vae_stays_fp32_unless_told_otherwise():
    model = tiny_model("sdxl").to(torch.device("cpu"), torch.float16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.float32  # as diffusers upcasts it
    model.to(torch.device("cpu"), torch.float16, torch.bfloat16)
    assert model.unet.dtype == torch.float16 and model.vae.dtype == torch.bfloat16


# ---------------------------------------------------------------- prompts longer than one window (A1111's chunks)
LONG = "a detailed photo of a " + "red cat on a blue sofa, " * 16  # 117 tokens: 2 windows of 75
VERY_LONG = "a detailed photo of a " + "red cat on a blue sofa, " * 40  # 285 tokens: 4 windows


def job(prompt, negative="", seed=1, guidance_scale=7.5):
    return ImageJob(id=prompt[:8], image_index=0, prompt=prompt, negative_prompt=negative, seed=seed, width=64,
                    height=64, steps=2, guidance_scale=guidance_scale, extra={})


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_prompt_that_fits_one_window_gets_diffusers_embeddings(family):
    model = tiny_model(family)
    pipe = diffusers_pipeline(model, make_scheduler(compose_config().scheduler, model.scheduler_config))
    for prompt in ["a red cat on a sofa", ""]:
        ours = model.encode([prompt], max_chunks=3)
        theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        assert ours.embeds.shape[1] == 77 and ours.chunks == [1] and ours.truncated == [False]
        assert torch.equal(ours.embeds, theirs[0])
        if family == "sdxl":
            assert torch.equal(ours.pooled, theirs[2])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_long_prompt_is_encoded_in_windows_of_75_tokens(family):
    model = tiny_model(family)
    assert [model.prompt_chunks(t) for t in ("", "a red cat", LONG, VERY_LONG)] == [1, 1, 2, 4]
    full, cut = model.encode([LONG], max_chunks=3), model.encode([LONG], max_chunks=1)
    assert full.embeds.shape[1] == 2 * 77 and (full.chunks, full.truncated) == ([2], [False])
    assert cut.embeds.shape[1] == 77 and (cut.chunks, cut.truncated) == ([1], [True])
    assert torch.allclose(full.embeds[:, :77], cut.embeds, atol=1e-5)  # the first window is the truncated prompt
    empty = model.encode([""]).embeds
    assert not torch.allclose(full.embeds[:, 77:], empty, atol=1e-3)  # the second window carries the rest
    if family == "sdxl":
        assert torch.allclose(full.pooled, cut.pooled, atol=1e-5)  # pooled from the first window, as A1111 does

    batch = model.encode(["a red cat", LONG, VERY_LONG], max_chunks=3)
    assert batch.embeds.shape[1] == 3 * 77 and batch.chunks == [1, 2, 3] and batch.truncated == [False, False, True]
    short = model.encode(["a red cat"]).embeds[0]
    assert torch.allclose(batch.embeds[0], torch.cat([short, empty[0], empty[0]]), atol=1e-5)  # padded with empty windows
    assert torch.allclose(batch.embeds[1, :154], full.embeds[0], atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_long_prompt_renders_from_all_its_windows_and_flags_only_what_is_cut(family):
    model = tiny_model(family)
    scheduler_cfg = compose_config().scheduler
    windows, truncated = Renderer(model, scheduler_cfg), Renderer(model, scheduler_cfg, max_prompt_chunks=1)
    full, cut = windows.render([job(LONG)]), truncated.render([job(LONG)])
    assert (full.truncated, cut.truncated) == ([False], [True])
    assert np.abs(full.pixels[0].numpy().astype(int) - cut.pixels[0].numpy().astype(int)).max() > 2
    assert windows.render([job(VERY_LONG)]).truncated == [True]

    # a batch of mixed lengths (and a negative prompt longer than every prompt) shares one padded length
    mixed = windows.render([job("a red cat"), job(LONG), job("a blue dog", negative=VERY_LONG)])
    assert mixed.failures == [None] * 3 and mixed.truncated == [False, False, False]
    # the batch key keeps lengths apart, so an image's conditioning never depends on its neighbours
    assert [windows.batch_key(j)[-1] for j in (job("a"), job(LONG), job("a", negative=LONG),
                                               job("a", negative=LONG, guidance_scale=1), job(VERY_LONG))] == [1, 2, 2, 1, 3]


def test_text_cache_encodes_each_distinct_text_once():
    model = tiny_model("sd")
    renderer = Renderer(model, compose_config().scheduler)
    calls = []
    encode = model.encode
    model.encode = lambda texts, **kw: calls.append(list(texts)) or encode(texts, **kw)
    first = renderer.conditioning(["a red cat", LONG, "a red cat"])
    assert first.embeds.shape[:2] == (3, 154) and first.chunks == [2, 2, 2]
    assert calls == [["a red cat", LONG], [""]]  # the two texts, then the empty window that pads the short one
    again = renderer.conditioning([LONG, "a red cat"], chunks=3)
    assert len(calls) == 2 and again.embeds.shape[1] == 3 * 77
    assert torch.equal(again.embeds[0, :154], first.embeds[1]) and torch.equal(again.embeds[1, :154], first.embeds[0])
