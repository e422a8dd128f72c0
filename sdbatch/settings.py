"""Every setting of a run (and of the report) checked in plain Python before torch is imported: one error lists all."""

import difflib
import json
import math
import os
import re
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdbatch import SdbatchError

CONF_DIR = Path(__file__).parent / "conf"
ARCH_DIR = Path(__file__).parent / "arch"
SD_SCHEDULE = {"num_train_timesteps": 1000, "steps_offset": 1}  # models.SD_SCHEDULER_CONFIG: a folder without one
SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")  # attention.SDPA_KERNELS, plus auto
XFORMERS_OPS = ("auto", "cutlass", "flash", "flash3")
ABSENT = object()

# The most steps a scheduler class can place on T training timesteps with steps_offset o, per timestep_spacing;
# None = any number (Euler interpolates its sigmas). Measured with diffusers on the CPU, for T = 37, 100 and 1000
# and o = 0, 1, 2 (tests/test_settings.py measures again): one step more and the schedule repeats timesteps (PNDM:
# all of them), produces NaN (DPM-Solver++) or indexes past the training schedule (IndexError).
STEP_LIMITS = {
    "PNDMScheduler": {"leading": lambda t, o: t - o, "linspace": lambda t, o: t, "trailing": lambda t, o: t},
    "DPMSolverMultistepScheduler": {"leading": lambda t, o: t - 1 - o, "linspace": lambda t, o: t - 1,
                                    "trailing": lambda t, o: t},
    "EulerDiscreteScheduler": {"leading": lambda t, o: t, "linspace": None, "trailing": lambda t, o: t},
}
DEFAULT_SPACING = {"PNDMScheduler": "leading", "DPMSolverMultistepScheduler": "linspace",
                   "EulerDiscreteScheduler": "linspace"}


# ---------------------------------------------------------------- rules: value -> what is wrong, or None
def whole(low: int | None = None, high: int | None = None):
    def rule(value):
        if not is_int(value):
            return "must be a whole number" + (f" of at least {low}" if low is not None else "")
        if low is not None and value < low:
            return f"must be at least {low}"
        if high is not None and value > high:
            return f"must be at most {high}"
    return rule


def number(value):
    if not is_number(value) or not math.isfinite(value):
        return "must be a finite number"


def seconds(value):
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        return "must be a number of seconds above 0"


def price(value):
    if not is_number(value) or not math.isfinite(value) or value < 0:
        return "must be a price per GPU-hour: a finite number of at least 0 (null for none)"


def boolean(value):
    if not isinstance(value, bool):
        return "must be true or false"


def text(value):
    if value is None:
        return "must be text ('' for none)"
    if not isinstance(value, str):
        return "must be text" + (f" (quote it: '{show(value)}')" if is_number(value) or isinstance(value, bool) else "")


def path(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return "must be a path"
    return text(value)


def optional(rule):
    return lambda value: None if value is None else rule(value)


def choice(*options: str):
    def rule(value):
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            return f"must be {' | '.join(options)}" + (f" (did you mean {close[0]}?)" if close else "")
    return rule


def multiple_of_8(value):
    if not is_int(value) or value <= 0 or value % 8:
        return "must be a positive multiple of 8"


def device(value):
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value)):
        return "must be auto | cpu | cuda | cuda:N (cuda for a GPU)"


def processes(value):
    if value != "auto" and not (is_int(value) and value >= 1):
        return "must be auto or a whole number of at least 1"


def class_name(value):
    if not (isinstance(value, str) and value.isidentifier()):
        return "must be the name of a diffusers scheduler class"


def mapping(value):
    if value is not None and not isinstance(value, (dict, DictConfig)):
        return "must be a mapping of keyword arguments"


def loras(value):
    """The run-level LoRAs: a list of {path: FILE, scale: NUMBER}."""
    shape = "must be a list of {path: FILE.safetensors, scale: NUMBER} ([] for none)"
    if not isinstance(value, (list, ListConfig)):
        return shape
    for i, item in enumerate(value):
        if not isinstance(item, (dict, DictConfig)) or "path" not in item:
            return f"{shape}: item {i} has no path"
        unknown = sorted(set(item) - {"path", "scale"})
        if unknown:
            return f"{shape}: item {i} has {', '.join(unknown)}, which sdbatch does not know"
        problem = path(item["path"]) or optional(number)(item.get("scale"))
        if problem:
            return f"{shape}: item {i}'s {'path' if path(item['path']) else 'scale'} {problem}"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


RUN_RULES = {
    "prompts": path,
    "output_dir": path,
    "steps": whole(1),
    "guidance_scale": number,
    "width": optional(multiple_of_8),
    "height": optional(multiple_of_8),
    "negative_prompt": text,
    "seed": whole(),
    "batch_size": whole(1),
    "shard_size": whole(1),
    "on_invalid": choice("error", "skip"),
    "overwrite": boolean,
    "prune": boolean,
    "worker_index": optional(whole(0)),
    "num_workers": optional(whole(1)),
    "processes": processes,
    "device": device,
    "dtype": choice("auto", "fp16", "bf16", "fp32", "fp8"),
    "vae_dtype": choice("auto", "fp16", "bf16", "fp32"),
    "compile": boolean,
    "compile_mode": choice("default", "max-autotune-no-cudagraphs", "max-autotune"),
    "compile_scope": choice("model", "blocks"),
    "compile_engine": choice("aot", "jit"),
    "compile_cache": optional(path),
    "fuse_qkv": boolean,
    "channels_last": boolean,
    "write_threads": whole(1),
    "image_format": choice("png", "webp", "jpeg"),
    "image_quality": whole(1, 100),
    "image_lossless": boolean,
    "stop_timeout_s": seconds,
    "lease_s": seconds,
    "steal": boolean,
    "max_prompt_chunks": whole(1),
    "progress": boolean,
    "gpu_hour_cost": optional(price),
    "lora": loras,
    "model.name": text,
    "model.family": choice("sd", "sdxl"),
    "model.path": optional(path),
    "model.random_weights": boolean,
    "model.width": multiple_of_8,
    "model.height": multiple_of_8,
    "attention.name": lambda value: choice(*attention_backends())(value),  # a new backend is a new yaml
    "scheduler.name": text,
    "scheduler.class_name": class_name,
    "scheduler.sampler": text,
    "scheduler.options": mapping,
}
IF_PRESENT = {"attention.kernel": choice(*SDPA_KERNELS), "attention.op": choice(*XFORMERS_OPS)}
REPORT_RULES = {"output_dir": path, "merged": boolean, "thumb_size": whole(1), "max_thumbs": whole(0),
                "gpu_hour_cost": optional(price)}
MISSING_HINTS = {
    "prompts": "pass prompts=PATH to a Parquet file with a 'prompt' column",
    "output_dir": "say which run to report on: python -m sdbatch.report output_dir=DIR",
}


# ---------------------------------------------------------------- checks
def check(cfg) -> None:
    """Raise SdbatchError naming every invalid run setting of a composed config; return None when all are valid.

    Plain Python on the config alone (no torch): types, ranges, finite numbers, enumerations, and steps within
    what the scheduler can place on the model's training schedule."""
    raise_for(run_problems(cfg))


def check_report(cfg) -> None:
    """Like check, for the report's settings (report.yaml)."""
    raise_for(report_problems(cfg))


def run_problems(cfg) -> list[str]:
    """What check(cfg) would report, one phrase per problem."""
    problems, values = read(cfg, RUN_RULES, IF_PRESENT)
    return problems + cross_problems(cfg, values)


def report_problems(cfg) -> list[str]:
    return read(cfg, REPORT_RULES, {})[0]


def raise_for(problems: list[str]) -> None:
    if problems:
        raise SdbatchError("Invalid settings: " + "; ".join(problems) + ".")


def read(cfg, rules: dict, if_present: dict) -> tuple[list[str], dict]:
    """(problems, valid values by key) for every key a rule names."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    problems, values = [], {}
    for key, rule in {**rules, **if_present}.items():
        try:
            value = OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=True)
        except MissingMandatoryValue:
            hint = MISSING_HINTS.get(key)
            problems.append(f"{key} is missing" + (f": {hint}" if hint else ""))
            continue
        except OmegaConfBaseException as error:
            problems.append(f"{key} cannot be read ({str(error).splitlines()[0]})")
            continue
        if value is ABSENT:
            if key in rules:
                problems.append(f"{key} is missing")
            continue
        problem = rule(value)
        if problem:
            problems.append(f"{key}={show(value)} {problem}")
        else:
            values[key] = value
    return problems, values


def cross_problems(cfg, values: dict) -> list[str]:
    """Rules between keys, checked only where each key alone is valid."""
    problems = []
    index, count = values.get("worker_index", ABSENT), values.get("num_workers", ABSENT)
    if is_int(index) and count is None:
        problems.append(f"worker_index={index} needs num_workers= too (the number of workers)")
    if is_int(index) and is_int(count) and index >= count:
        problems.append(f"worker_index={index} is outside 0..{count - 1} (num_workers={count})")
    name, random_weights = values.get("model.name"), values.get("model.random_weights")
    if random_weights and name != "tiny" and not (ARCH_DIR / str(name)).is_dir():
        known = sorted(p.name for p in ARCH_DIR.iterdir() if p.is_dir()) + ["tiny"]
        problems.append(f"model.random_weights=true needs a built-in architecture, and model.name={name} is not "
                        f"one of {', '.join(sorted(known))}")
    needed = ("steps", "scheduler.class_name", "scheduler.options", "model.name", "model.random_weights")
    if all(key in values for key in needed) and "model.path" in values:
        limit, timesteps = max_steps(cfg)
        if limit is not None and values["steps"] > limit:
            problems.append(f"steps={values['steps']} is more than scheduler={cfg.scheduler.name} can place on the "
                            f"model's {timesteps} training timesteps: at most {limit}")
    sizes = ("model.name", "model.random_weights", "model.width", "model.height")
    if all(key in values for key in sizes) and "model.path" in values:
        smallest = min_image_size(cfg.model)
        for key in ("width", "height"):
            size = values.get(key) or values[f"model.{key}"]
            if is_int(size) and size < smallest:
                problems.append(f"{key}={size} is below what model={cfg.model.name} can render: at least {smallest}")
    return problems


def min_image_size(model) -> int:
    """The smallest width/height the model renders: its latents must keep at least 2x2 pixels at the UNet's
    deepest level (a 1x1 map breaks the VAE's and UNet's group norms). Read from the configs, without torch."""
    unet, vae = model_config(model, "unet"), model_config(model, "vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    downsamples = len(unet.get("down_block_types", [0] * 4)) - 1
    return scale * max(2, 2 ** downsamples)


def model_config(model, part: str) -> dict:
    """unet or vae config.json of the model: a built-in architecture's, or a local folder's (SD's when unknown)."""
    if model.random_weights or (model.path and os.path.isfile(str(model.path))):
        name = f"tiny-{model.family}" if model.name == "tiny" else str(model.name)
        file = ARCH_DIR / name / f"{part}.json"
    elif model.path:
        folder = model.path if os.path.isdir(model.path) else hub_snapshot(str(model.path))
        file = Path(folder, part, "config.json") if folder else None
    else:
        file = None
    try:
        return json.loads(file.read_text()) if file is not None and file.is_file() else {}
    except (OSError, ValueError):
        return {}


def max_steps(cfg) -> tuple[int | None, int]:
    """(the most denoising steps cfg.scheduler can place on cfg.model's training schedule or None for any number,
    the number of training timesteps). Also the bound for a manifest row's `steps`."""
    schedule = {**model_schedule(cfg.model), **OmegaConf.to_container(cfg.scheduler.options or OmegaConf.create())}
    timesteps, offset = schedule.get("num_train_timesteps", 1000), schedule.get("steps_offset", 0)
    if not (is_int(timesteps) and is_int(offset)):
        return None, timesteps
    class_name = cfg.scheduler.class_name
    spacing = schedule.get("timestep_spacing") or DEFAULT_SPACING.get(class_name, "leading")
    limits = STEP_LIMITS.get(class_name, {})
    limit = limits.get(spacing, lambda t, o: t)  # another scheduler: at most one step per training timestep
    return (None if limit is None else limit(timesteps, offset)), timesteps


def model_schedule(model) -> dict:
    """The model's scheduler config as models.load_model finds it: a built-in architecture's scheduler.json, a
    local folder's scheduler/scheduler_config.json, else Stable Diffusion's (1000 timesteps)."""
    file = schedule_file(model)
    try:
        loaded = json.loads(file.read_text()) if file is not None and file.is_file() else {}
    except (OSError, ValueError):
        loaded = {}
    return loaded if isinstance(loaded, dict) and loaded else dict(SD_SCHEDULE)


def schedule_file(model) -> Path | None:
    if model.random_weights:
        return ARCH_DIR / str(model.name) / "scheduler.json" if model.name != "tiny" else None
    if not model.path:
        return None
    folder = model.path if os.path.isdir(model.path) else hub_snapshot(str(model.path))
    return Path(folder, "scheduler", "scheduler_config.json") if folder else None


def hub_snapshot(repo_id: str) -> Path | None:
    """A hub id's folder in the local Hugging Face cache, where snapshot_download(local_files_only=True) finds it."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    repo = Path(cache).expanduser() / f"models--{repo_id.replace('/', '--')}"
    try:
        return repo / "snapshots" / (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None


def attention_backends() -> list[str]:
    """The attention group's options: one yaml per backend."""
    return sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))


def show(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    return str(value)
