"""settings.check on composed configs, and the steps limits measured again with diffusers on the CPU."""

import itertools
import json
import warnings

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config
from sdbatch import SdbatchError, settings


def problems(*overrides: str) -> str:
    """The error settings.check raises for the shipped config with these overrides ('' when none)."""
    try:
        settings.check(compose_config("prompts=catalog.parquet", *overrides))
    except SdbatchError as error:
        assert "\n" not in str(error)
        return str(error)
    return ""


def test_shipped_defaults_pass():
    assert problems() == ""
    for model, scheduler, attention in itertools.product(["tiny", "sd15", "sd21", "sdxl"], ["pndm", "dpmpp", "euler"],
                                                         settings.attention_backends()):
        assert problems(f"model={model}", f"scheduler={scheduler}", f"attention={attention}") == ""


def test_every_config_key_has_a_rule():
    keys = set(OmegaConf.load(CONF_DIR / "config.yaml")) - {"defaults", "hydra"}
    assert keys == {key for key in settings.RUN_RULES if "." not in key}
    report_keys = set(OmegaConf.load(CONF_DIR / "report.yaml")) - {"defaults", "hydra"}
    assert report_keys == set(settings.REPORT_RULES)


def test_attention_options_match_the_backends():
    attention = pytest.importorskip("sdbatch.attention")
    assert set(settings.SDPA_KERNELS) == {"auto", *attention.SDPA_KERNELS}
    assert set(settings.XFORMERS_OPS) == {"auto", *attention.XFORMERS_OPS}


BAD = {  # override -> words of the problem
    "device=gpu": "device=gpu must be auto | cpu | cuda | cuda:N",
    "device=cuda:x": "device=cuda:x must be",
    "negative_prompt=null": "negative_prompt=null must be text",
    "guidance_scale=nan": "guidance_scale=nan must be a finite number",
    "guidance_scale=inf": "guidance_scale=inf must be a finite number",
    "guidance_scale=-inf": "guidance_scale=-inf must be a finite number",
    "guidance_scale=high": "guidance_scale=high must be a finite number",
    "steps=0": "steps=0 must be at least 1",
    "steps=2.5": "steps=2.5 must be a whole number",
    "steps=1000": "steps=1000 is more than scheduler=pndm can place on the model's 1000 training timesteps: "
                  "at most 999",
    "width=100": "width=100 must be a positive multiple of 8",
    "height=-8": "height=-8 must be a positive multiple of 8",
    "batch_size=0": "batch_size=0 must be at least 1",
    "shard_size=true": "shard_size=true must be a whole number",
    "write_threads=0": "write_threads=0 must be at least 1",
    "stop_timeout_s=0": "stop_timeout_s=0 must be a number of seconds above 0",
    "lease_s=nan": "lease_s=nan must be a number of seconds above 0",
    "processes=0": "processes=0 must be auto or a whole number of at least 1",
    "processes=many": "processes=many must be auto or a whole number",
    "dtype=int8": "dtype=int8 must be auto | fp16 | bf16 | fp32 | fp8",
    "on_invalid=ignore": "on_invalid=ignore must be error | skip",
    "compile_mode=fast": "compile_mode=fast must be default |",
    "compile_scope=layers": "compile_scope=layers must be model | blocks",
    "compile_engine=fast": "compile_engine=fast must be aot | jit",
    "progress=yes": "progress=yes must be true or false",
    "gpu_hour_cost=-1": "gpu_hour_cost=-1 must be a price per GPU-hour: a finite number of at least 0",
    "gpu_hour_cost=nan": "gpu_hour_cost=nan must be a price per GPU-hour",
    "overwrite=1": "overwrite=1 must be true or false",
    "seed=1.5": "seed=1.5 must be a whole number",
    "output_dir=2024": "output_dir=2024 must be text (quote it: '2024')",
    "output_dir=''": "output_dir='' must be a path",
    "prompts=null": "prompts=null must be a path",
    "worker_index=-1": "worker_index=-1 must be at least 0",
    "num_workers=0": "num_workers=0 must be at least 1",
    "worker_index=2": "worker_index=2 needs num_workers=",
    "model.family=sd3": "model.family=sd3 must be sd | sdxl",
    "model.width=500": "model.width=500 must be a positive multiple of 8",
    "attention.name=flash": "attention.name=flash must be auto | sdpa | vanilla | xformers",
    "scheduler.class_name='no class'": "scheduler.class_name=no class must be the name of a diffusers scheduler class",
}


@pytest.mark.parametrize("override", list(BAD))
def test_each_bad_setting_is_named(override):
    assert BAD[override] in problems(override)


def test_every_problem_in_one_error():
    message = problems("device=gpu", "steps=0", "guidance_scale=nan", "attention=sdpa", "attention.kernel=flsh")
    assert message.startswith("Invalid settings: ") and message.count("; ") == 3
    assert "attention.kernel=flsh must be auto | flash | efficient | cudnn | math (did you mean flash?)" in message


def test_missing_values():
    message = problems("prompts=???", "~negative_prompt")
    assert "prompts is missing: pass prompts=PATH" in message and "negative_prompt is missing" in message


def test_worker_index_within_num_workers():
    assert "worker_index=2 is outside 0..1 (num_workers=2)" in problems("worker_index=2", "num_workers=2")
    assert problems("worker_index=1", "num_workers=2") == ""


def test_random_weights_need_a_built_in_architecture():
    message = problems("model=sd15", "model.random_weights=true", "model.name=sd3")
    assert "model.name=sd3 is not one of sd15, sd21, sdxl, tiny" in message


def test_report_settings():
    cfg = OmegaConf.create({"output_dir": "out", "merged": "yes", "thumb_size": 0, "max_thumbs": -1,
                            "gpu_hour_cost": -0.5})
    with pytest.raises(SdbatchError) as caught:
        settings.check_report(cfg)
    assert str(caught.value) == ("Invalid settings: merged=yes must be true or false; thumb_size=0 must be at least 1; "
                                 "max_thumbs=-1 must be at least 0; gpu_hour_cost=-0.5 must be a price per GPU-hour: "
                                 "a finite number of at least 0 (null for none).")
    for price in (None, 0, 2.49):
        settings.check_report(OmegaConf.create({"output_dir": "out", "merged": True, "thumb_size": 64,
                                                "max_thumbs": 0, "gpu_hour_cost": price}))


# ---------------------------------------------------------------- steps: the model's schedule, the scheduler's limit
SHIPPED_LIMITS = {  # (model, scheduler) -> the most steps, with the built-in architectures' scheduler configs
    ("tiny", "pndm"): 999, ("tiny", "dpmpp"): 999, ("tiny", "euler"): None,
    ("sd15", "pndm"): 999, ("sd15", "dpmpp"): 999, ("sd15", "euler"): None,
    ("sd21", "pndm"): 999, ("sd21", "dpmpp"): 999, ("sd21", "euler"): None,
    ("sdxl", "pndm"): 999, ("sdxl", "dpmpp"): 998, ("sdxl", "euler"): 1000,  # SDXL: "leading" timestep spacing
}


def shipped_cfg(model: str, scheduler: str, *overrides: str):
    return compose_config("prompts=x", f"model={model}", f"scheduler={scheduler}", "model.random_weights=true",
                          *overrides)


@pytest.mark.parametrize("model, scheduler", list(SHIPPED_LIMITS))
def test_shipped_limits(model, scheduler):
    cfg = shipped_cfg(model, scheduler)
    assert settings.max_steps(cfg) == (SHIPPED_LIMITS[model, scheduler], 1000)


def test_a_local_folder_brings_its_own_schedule(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        '{"num_train_timesteps": 500, "steps_offset": 1, "timestep_spacing": "leading"}')
    cfg = compose_config("prompts=x", "model=sd15", f"model.path={tmp_path}", "scheduler=dpmpp", "steps=498")
    assert settings.max_steps(cfg) == (498, 500)
    assert "steps=499 is more than scheduler=dpmpp can place on the model's 500 training timesteps: at most 498" in \
        problems("model=sd15", f"model.path={tmp_path}", "scheduler=dpmpp", "steps=499")


def test_scheduler_options_count():
    cfg = shipped_cfg("tiny", "euler", "+scheduler.options.timestep_spacing=trailing")
    assert settings.max_steps(cfg) == (1000, 1000)


def places(scheduler_cfg, class_name: str, steps: int) -> bool:
    """Whether diffusers runs `steps` steps of this scheduler to a finite result, repeating no timestep (but the one
    PNDM's PLMS warm-up repeats by design)."""
    import diffusers
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = getattr(diffusers, class_name).from_config(scheduler_cfg)
        try:
            scheduler.set_timesteps(steps)
            latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
            noise = torch.Generator().manual_seed(1)
            for t in scheduler.timesteps:
                scheduler.scale_model_input(latents, t)
                output = torch.randn(1, 4, 2, 2, generator=noise) * 0.5
                latents = scheduler.step(output, t, latents, return_dict=False)[0]
        except (IndexError, ValueError):
            return False
    timesteps = scheduler.timesteps.numpy()
    repeats = len(timesteps) - len(np.unique(timesteps))
    return bool(torch.isfinite(latents).all()) and repeats <= (class_name == "PNDMScheduler")


@pytest.mark.parametrize("class_name, spacing, offset", [
    (c, s, o) for c in settings.STEP_LIMITS for s in ("leading", "linspace", "trailing") for o in (0, 1, 2)])
def test_step_limits_measured_again(class_name, spacing, offset):
    timesteps = 37
    scheduler_cfg = {"num_train_timesteps": timesteps, "timestep_spacing": spacing, "steps_offset": offset,
                     "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "skip_prk_steps": True, "algorithm_type": "dpmsolver++"}
    limit = settings.STEP_LIMITS[class_name][spacing]
    if limit is None:
        assert places(scheduler_cfg, class_name, 3 * timesteps)
    else:
        assert places(scheduler_cfg, class_name, limit(timesteps, offset))
        assert not places(scheduler_cfg, class_name, limit(timesteps, offset) + 1)


@pytest.mark.parametrize("model, scheduler", [("tiny", "pndm"), ("sdxl", "dpmpp"), ("sdxl", "euler")])
def test_shipped_limits_measured_again(model, scheduler):
    """The real 1000-timestep schedules: the limit runs, one more step does not."""
    from sdbatch.models import ARCH_DIR, SD_SCHEDULER_CONFIG

    cfg = shipped_cfg(model, scheduler)
    schedule = SD_SCHEDULER_CONFIG if model == "tiny" else json.loads((ARCH_DIR / model / "scheduler.json").read_text())
    scheduler_cfg = {**schedule, **cfg.scheduler.options}
    limit, _ = settings.max_steps(cfg)
    assert places(scheduler_cfg, cfg.scheduler.class_name, limit)
    assert not places(scheduler_cfg, cfg.scheduler.class_name, limit + 1)
