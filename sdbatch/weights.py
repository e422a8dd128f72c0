"""Where a model's weights (and LoRA files) are, whether sdbatch can load them, and what identifies them (all without
importing torch)."""

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sdbatch import SdbatchError

ARCH_DIR = Path(__file__).parent / "arch"
TINY_REVISION = {"sd": "random:tiny-sd-v2", "sdxl": "random:tiny-sdxl-v2"}  # bump whenever tiny's pixels change
RANDOM_REVISION = "random:{arch}-v2"  # full-size random weights (v2: the real CLIP vocabulary)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
WHOLE_FILE_BYTES = 1 << 20  # configs and vocabularies are hashed whole
TENSOR_SAMPLE_BYTES = 4096  # per safetensors tensor: its first 4 KiB
FILE_SAMPLES, FILE_SAMPLE_BYTES = 16, 64 * 1024  # other large files: 16 blocks at offsets fixed by the size
SUPPORTED = ("a diffusers model folder (unet/, vae/, text_encoder/, tokenizer/ with .safetensors weights, as "
             "save_pretrained writes it), a hub id already in the local Hugging Face cache, or a single-file "
             ".safetensors checkpoint in the original (A1111/civitai) layout")
# what marks each checkpoint layout's parts (key prefixes of the original Stable Diffusion repositories)
LAYOUT_TEXT = {"sdxl": "conditioner.embedders.1.model.", "sd2": "cond_stage_model.model.",
               "sd1": "cond_stage_model.transformer.", "sdxl-refiner": "conditioner.embedders.0.model."}
LAYOUT_NAMES = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL", "sdxl-refiner": "an SDXL refiner"}
LAYOUT_MODEL = {"sd1": "model=sd15", "sd2": "model=sd21", "sdxl": "model=sdxl",
                "sdxl-refiner": "a base model (refiners are not supported)"}
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."


@dataclass
class Weights:
    path: Path  # resolved absolute path: a diffusers folder or one .safetensors file
    source: str  # the path as text, or "<repo id>@<commit>" for a snapshot in the Hugging Face cache
    single_file: bool = False
    layout: str | None = None  # single files: sd1 | sd2 | sdxl


def model_revision(cfg) -> str:
    """What identifies the weights (part of every image's content key), known before loading them: `random:<arch>`
    for built-in random weights, else where they are plus a fingerprint of their content."""
    if cfg.random_weights:
        return TINY_REVISION[cfg.family] if cfg.name == "tiny" else RANDOM_REVISION.format(arch=cfg.name)
    return weights_revision(locate_weights(cfg))


def weights_revision(weights: "Weights") -> str:
    return f"{weights.source} sha256:{fingerprint(weights.path)[:16]}"


def arch_name(cfg) -> str:
    """The built-in architecture (sdbatch/arch/<name>) of a model config: tiny-sd, tiny-sdxl, sd15, sd21, sdxl."""
    return f"tiny-{cfg.family}" if cfg.name == "tiny" else str(cfg.name)


def arch_info(arch: str) -> dict:
    return json.loads((ARCH_DIR / arch / "model.json").read_text())


def known_archs() -> list[str]:
    return sorted(p.name for p in ARCH_DIR.iterdir() if (p / "model.json").exists())


# ---------------------------------------------------------------- finding and checking the weights
def locate_weights(cfg) -> Weights:
    """The weights named by model.path, checked for what sdbatch can load; a plain-words SdbatchError otherwise."""
    given = str(cfg.path) if cfg.get("path") else ""
    if not given:
        raise SdbatchError(f"model={cfg.name} has no model.path. Set model.path to {SUPPORTED}; or use model=tiny "
                           f"(or model.random_weights=true) to run without weights.")
    path = Path(given).expanduser()
    if path.is_file():
        path = path.resolve()
        return Weights(path, str(path), single_file=True, layout=check_single_file(path, cfg))
    if path.is_dir():
        path = path.resolve()
        check_folder(path, cfg.family, given)
        return Weights(path, str(path))
    snapshot = cached_snapshot(given)
    if snapshot is not None:
        check_folder(snapshot, cfg.family, given)
        return Weights(snapshot, f"{given}@{snapshot.name}")
    hub = " and is not a hub id in the local Hugging Face cache (sdbatch never downloads)"
    hub = hub if looks_like_hub_id(given) else ""
    raise SdbatchError(f"model.path={given} does not exist{hub}. Point model.path at {SUPPORTED}; or use model=tiny "
                       f"to try sdbatch without weights.")


def looks_like_hub_id(text: str) -> bool:
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def cached_snapshot(repo_id: str) -> Path | None:
    if not looks_like_hub_id(repo_id):
        return None
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True)).resolve()
    except Exception:  # not in the cache (or no huggingface_hub): the caller says so in plain words
        return None


def check_single_file(path: Path, cfg) -> str:
    """The checkpoint layout (sd1 | sd2 | sdxl) of a single-file checkpoint that fits model=<cfg.name>."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SdbatchError(
            f"model.path={path} is a pickle checkpoint ({suffix}); sdbatch loads safetensors only, because loading a "
            f"pickle file can run any code it contains. Use the .safetensors version of this checkpoint (most model "
            f"pages offer one), or convert it once on a trusted machine.")
    if suffix != ".safetensors":
        raise SdbatchError(f"model.path={path} is a {suffix or 'suffix-less'} file, which sdbatch cannot load. "
                           f"Point model.path at {SUPPORTED}.")
    keys = list(safetensors_header(path))
    layout = checkpoint_layout(keys)
    arch = arch_name(cfg)
    if not (ARCH_DIR / arch / "model.json").exists():
        raise SdbatchError(f"model.path={path} is a single-file checkpoint, which sdbatch loads with one of its "
                           f"built-in architectures ({', '.join(known_archs())}), and model={cfg.name} is none of "
                           f"them: use model=sd15, model=sd21 or model=sdxl with this model.path.")
    expected = arch_info(arch)["checkpoint_layout"]
    missing = [part for part, prefix in (("UNet", UNET_PREFIX), ("VAE", VAE_PREFIX))
               if not any(k.startswith(prefix) for k in keys)]
    if layout is None:
        missing.append("text encoder")
    if missing:
        raise SdbatchError(
            f"model.path={path} holds no {' and no '.join(missing)} in the original Stable Diffusion layout "
            f"(keys {UNET_PREFIX}*, {VAE_PREFIX}*, cond_stage_model.* or conditioner.*; its {len(keys)} tensors "
            f"start with {', '.join(sorted({k.split('.')[0] for k in keys})[:5]) or 'nothing'}). sdbatch loads full "
            f"single-file checkpoints (UNet, VAE and text encoders in one file), not a UNet, VAE or LoRA alone.")
    if layout != expected:
        raise SdbatchError(f"model.path={path} is {LAYOUT_NAMES[layout]} checkpoint (its text encoder keys start with "
                           f"{LAYOUT_TEXT[layout]}), but model={cfg.name} expects {LAYOUT_NAMES[expected]} one: use "
                           f"{LAYOUT_MODEL[layout]} for this file.")
    return layout


def checkpoint_layout(keys: list[str]) -> str | None:
    """Which original repository layout a single-file checkpoint's text encoders are in, from its key names."""
    for layout, prefix in LAYOUT_TEXT.items():
        if any(k.startswith(prefix) for k in keys):
            return layout
    return None


COMPONENTS = {"sd": ("unet", "vae", "text_encoder", "tokenizer"),
              "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


def check_folder(folder: Path, family: str, given: str) -> None:
    """A diffusers model folder with every component the family needs, each with its config and safetensors."""
    entries = listing(folder)
    if not entries:
        raise SdbatchError(f"model.path={given} is an empty folder. Point model.path at {SUPPORTED}.")
    needed = COMPONENTS.get(family, COMPONENTS["sd"])
    missing = [name for name in needed if not (folder / name).is_dir()]
    if len(missing) == len(needed):
        single = [e for e in entries if e.endswith(".safetensors")]
        hint = f" To load the single-file checkpoint in it, set model.path={folder / single[0]}." if len(single) == 1 else ""
        raise SdbatchError(f"model.path={given} is not a diffusers model folder: it holds {describe(entries)}, and "
                           f"none of {', '.join(n + '/' for n in needed)}. Point model.path at {SUPPORTED}.{hint}")
    if missing:
        raise SdbatchError(f"model.path={given} is a diffusers model folder without {', '.join(n + '/' for n in missing)} "
                           f"(it holds {describe(entries)}); a model={family} folder needs "
                           f"{', '.join(n + '/' for n in needed)}. Copy the missing part from the model's repository.")
    for name in needed:
        problem = tokenizer_problem(folder / name) if name.startswith("tokenizer") else component_problem(folder / name)
        if problem:
            raise SdbatchError(f"{folder / name} {problem}")


def component_problem(part: Path) -> str | None:
    files = listing(part)
    weights = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not weights and pickles:
        return (f"holds only pickle weights ({', '.join(pickles)}); sdbatch loads safetensors only, because pickle "
                f"files can run code when loaded. Convert them to .safetensors (diffusers' save_pretrained(..., "
                f"safe_serialization=True) does) and point model.path at that folder.")
    if not weights:
        return f"holds no .safetensors weights (it holds {describe(files)}): copy them from the model's repository."
    if "config.json" not in files:
        return f"has no config.json (it holds {describe(files)}): copy it from the model's repository."
    return None


def tokenizer_problem(part: Path) -> str | None:
    files = set(listing(part))
    if {"vocab.json", "merges.txt"} <= files or "tokenizer.json" in files:
        return None
    return (f"has neither vocab.json and merges.txt nor tokenizer.json (it holds {describe(sorted(files))}): copy "
            f"the tokenizer files from the model's repository.")


def listing(folder: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))


def describe(names: list[str], limit: int = 6) -> str:
    if not names:
        return "nothing"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def safetensors_header(path: Path) -> dict:
    """The tensor table of a .safetensors file ({name: {dtype, shape, data_offsets}}), read from its first bytes."""
    raw = read_header(path)
    if raw is None:
        raise SdbatchError(f"model.path={path} is not a valid safetensors file (its header does not parse): the "
                           f"download may be incomplete. Download it again.")
    return {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}


def read_header(path: Path) -> bytes | None:
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            return None
        size = struct.unpack("<Q", start)[0]
        if size > min(os.path.getsize(path) - 8, 100 << 20):
            return None
        raw = f.read(size)
    try:
        json.loads(raw)
    except ValueError:
        return None
    return raw


# ---------------------------------------------------------------- the content fingerprint
def fingerprint(path: Path, named: bool = True) -> str:
    """A cheap hash of the weights' content: per file its relative name, size and sampled bytes (whole small files;
    for .safetensors the header and the first 4 KiB of every tensor; else 16 blocks at fixed offsets). It reads
    megabytes, not the weights, and no mtime or inode goes in, so every host holding the same files agrees.
    named=False leaves a single file's name out (a LoRA moved or renamed is the same LoRA)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        (p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix())
    for file in files:
        name = (file.name if named else "") if file == path else file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            for block in sampled_blocks(f, size, file.suffix == ".safetensors"):
                digest.update(block)
    return digest.hexdigest()


def sampled_blocks(f, size: int, safetensors: bool):
    if size <= WHOLE_FILE_BYTES:
        yield f.read()
        return
    header = read_header(Path(f.name)) if safetensors else None
    if header is not None:
        yield header
        data_start = 8 + len(header)
        tensors = [v for k, v in json.loads(header).items() if k != "__metadata__"]
        for begin, end in sorted(t["data_offsets"] for t in tensors):
            f.seek(data_start + begin)
            yield f.read(min(end - begin, TENSOR_SAMPLE_BYTES))
        return
    for i in range(FILE_SAMPLES):
        f.seek((size - FILE_SAMPLE_BYTES) * i // (FILE_SAMPLES - 1))
        yield f.read(FILE_SAMPLE_BYTES)


# ---------------------------------------------------------------- LoRA files
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.",
                "_lora.up.")  # kohya (A1111), PEFT/diffusers, and diffusers' older attention-processor layouts


def lora_problem(path: str) -> str | None:
    """Why a LoRA file cannot be used, in words that complete "a lora file that ...", or None when it looks fine.
    Cheap: the file's suffix, its safetensors header and its tensor names; whether it fits the model is known only
    when it is loaded."""
    file = Path(path).expanduser()
    if not file.exists():
        return "does not exist"
    if not file.is_file():
        return "is a folder, not a .safetensors file"
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return (f"is a pickle file ({suffix}), which sdbatch never loads because loading one can run any code it "
                "contains (use its .safetensors version)")
    if suffix != ".safetensors":
        return f"is a {suffix or 'suffix-less'} file, not .safetensors"
    try:
        raw = read_header(file)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if raw is None:
        return "is not a valid safetensors file (its header does not parse; an incomplete copy?)"
    keys = [k for k in json.loads(raw) if k != "__metadata__"]
    if not keys or not any(marker in k for k in keys for marker in LORA_MARKERS):
        first = ", ".join(sorted({k.split(".")[0] for k in keys})[:3]) or "nothing"
        return (f"is not a LoRA (none of its {len(keys)} tensors is a LoRA down/up or A/B matrix; its names start "
                f"with {first})")
    return None


def lora_fingerprint(path: str) -> str:
    """What identifies a LoRA file in content keys: a fingerprint of its content (not its name, place or mtime)."""
    return fingerprint(Path(path).expanduser(), named=False)[:16]


class LoraFiles:
    """The manifest's LoRA files, each checked and fingerprinted once per run (on first use)."""

    def __init__(self):
        self.problems: dict = {}
        self.fingerprints: dict = {}

    def problem(self, path: str) -> str | None:
        if path not in self.problems:
            self.problems[path] = lora_problem(path)
        return self.problems[path]

    def state(self, path: str) -> str | None:
        """The file's fingerprint, or None when it cannot be used."""
        if path not in self.fingerprints:
            self.fingerprints[path] = None if self.problem(path) else lora_fingerprint(path)
        return self.fingerprints[path]
