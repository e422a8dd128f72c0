"""LoRA adapters on the model: run-level ones fused into the weights; per-row ones loaded once and switched per batch
(peft adapters and set_adapters, or, under torch.compile, one fixed-shape slot whose weights are copied in)."""

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdbatch import SdbatchError, first_line
from sdbatch.models import has_adapter

log = logging.getLogger("sdbatch")
CACHE_SIZE = 8  # per-row adapters kept loaded at once; the least recently used one goes first
SLOT = "sdbatch_slot"  # the compiled UNet's one adapter, whose weights each row's LoRA is copied into
UNSURE = ("unsure",)  # Adapters.active after a failed load or an unload: the next activate switches


class LoraError(Exception):
    """A LoRA file that cannot be applied to this model: its rows fail, the run goes on."""


@dataclass
class Loaded:
    """One per-row LoRA as it is held: peft adapter names per component, or the slot's weights for the UNet."""
    name: str
    unet: bool = False  # loaded as a peft adapter of the UNet (eager)
    encoders: list = field(default_factory=list)  # text encoders (by index) holding it as a peft adapter
    weights: dict | None = None  # slot mode: UNet module -> (lora_A, lora_B x its scaling), on the device


class Adapters:
    """The per-row LoRAs of a run. `activate(job)` puts a job's LoRA (or none) on the model before its batch.

    Eager: each LoRA is a peft adapter of the UNet and text encoders, loaded once (up to CACHE_SIZE, least
    recently used unloaded first) and switched with set_adapters; rows without one run with adapters disabled.
    Slot (compiled UNet): every LoRA of the manifest is read once at start, and the UNet gets one adapter covering
    all their layers at their highest rank before it is compiled; a switch copies the row's weights into it (zeros
    for rows without a LoRA), so the compiled graph never changes. Text encoders are never compiled: eager there."""

    def __init__(self, model, slot: bool = False):
        self.model, self.slot = model, slot
        self.loaded: OrderedDict = OrderedDict()  # (path, fingerprint) -> Loaded
        self.failed: dict = {}  # (path, fingerprint) -> why it cannot be applied
        self.active = None  # the adapter now on: job.adapter
        self.slot_params: dict = {}  # UNet module -> (lora_A weight, lora_B weight) of the slot
        self.count = 0
        self.switches = 0

    # ------------------------------------------------------------ before compiling
    def prepare(self, loras: dict) -> None:
        """Slot mode: read every LoRA file {path: fingerprint} once and give the UNet a slot covering all of them
        (before torch.compile). Files that do not fit are remembered: their rows fail."""
        if not self.slot or not loras:
            return
        shapes = {}
        for path, sha in loras.items():
            try:
                weights = unet_weights(self.model, path)
            except LoraError as error:
                self.failed[(path, sha)] = str(error)
                log.warning("%s; its rows will be recorded as failed", error)
                continue
            for module, (a, b) in weights.items():
                rank = max(a.shape[0], shapes.get(module, (0,))[0])
                shapes[module] = (rank, a.shape[1:], b.shape)
        if not shapes:
            return
        rank = max(r for r, _, _ in shapes.values())
        from peft import LoraConfig, inject_adapter_in_model
        with quiet():
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(shapes)),
                                    self.model.unet, adapter_name=SLOT)
        for name, module in self.model.unet.named_modules():
            if name in shapes:
                self.slot_params[name] = (module.lora_A[SLOT].weight, module.lora_B[SLOT].weight)
        with quiet():
            self.model.unet.to(self.model.device, self.model.dtype)
        self._fill({}, 1.0)
        log.info("per-row LoRAs: the compiled UNet has one adapter slot over %d layers at rank %d; a switch copies "
                 "weights into it (no recompiling)", len(shapes), rank)

    # ------------------------------------------------------------ per batch
    def activate(self, job) -> None:
        """Put the job's LoRA on the model (or take every per-row LoRA off); LoraError when it cannot be applied."""
        adapter = job.adapter
        if adapter == self.active:
            return
        key = None if adapter is None else (job.lora, job.lora_sha256)
        if key in self.failed:
            raise LoraError(self.failed[key])
        self.active, loaded = UNSURE, None
        if key is not None:
            try:
                loaded = self.load(*key)
            except LoraError as error:
                self.failed[key] = str(error)
                log.warning("%s; its rows are recorded as failed", error)
                raise
        self.switch(loaded, job.lora_scale)
        self.active = adapter
        self.switches += 1

    def switch(self, loaded: Loaded | None, scale: float) -> None:
        from diffusers.loaders.lora_base import (disable_lora_for_text_encoder, enable_lora_for_text_encoder,
                                                 set_adapters_for_text_encoder)
        unet = self.model.unet
        if self.slot:
            self._fill(loaded.weights if loaded else {}, scale)
        elif any(entry.unet for entry in self.loaded.values()):
            if loaded is not None and loaded.unet:
                unet.enable_lora()
                unet.set_adapters([loaded.name], [scale])
            else:
                unet.disable_lora()
        for index, encoder in enumerate(self.model.text_encoders):
            if not any(index in entry.encoders for entry in self.loaded.values()):
                continue
            if loaded is not None and index in loaded.encoders:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([loaded.name], encoder, [scale])
            else:
                disable_lora_for_text_encoder(encoder)

    @torch.no_grad()
    def _fill(self, weights: dict, scale: float) -> None:
        """Copy a LoRA's weights into the slot (rank padded with zeros); layers it does not touch get zeros."""
        for module, (slot_a, slot_b) in self.slot_params.items():
            pair = weights.get(module)
            if pair is None:
                slot_b.zero_()
                continue
            a, b = pair
            rank = a.shape[0]
            slot_a[rank:].zero_()
            slot_a[:rank].copy_(a)
            slot_b[:, rank:].zero_()
            slot_b[:, :rank].copy_(b).mul_(scale)

    def load(self, path: str, sha: str) -> Loaded:
        key = (path, sha)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        while len(self.loaded) >= CACHE_SIZE:
            self.unload(*self.loaded.popitem(last=False))
        self.count += 1
        name = f"sdbatch_row_{self.count}"
        if self.slot:
            weights = unet_weights(self.model, path)
            if any(module not in self.slot_params for module in weights):
                raise LoraError(f"the LoRA {path} changed since the run started (it touches layers the compiled "
                                f"UNet's slot lacks)")
            device, dtype = self.model.device, self.model.dtype
            weights = {m: (a.to(device, dtype), b.to(device, dtype)) for m, (a, b) in weights.items()}
            loaded = Loaded(name, weights=weights)
            loaded.encoders = load_adapter(self.model, path, name, unet=False)[1]
        else:
            loaded = Loaded(name, *load_adapter(self.model, path, name))
        self.loaded[key] = loaded
        return loaded

    def unload(self, key, loaded: Loaded) -> None:
        remove_adapter(self.model, loaded.name, loaded.unet, loaded.encoders)
        if self.active is not None and self.active[0] == key[1]:
            self.active = UNSURE


# ---------------------------------------------------------------- loading
def mixin(model):
    """diffusers' LoRA loader for the model's family: what its pipelines' load_lora_weights runs."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
    return StableDiffusionXLLoraLoaderMixin if model.family == "sdxl" else StableDiffusionLoraLoaderMixin


def encoder_prefixes(model) -> list[str]:
    return ["text_encoder", "text_encoder_2"][:len(model.text_encoders)]


def read_lora(model, path: str) -> tuple[dict, dict | None, dict | None]:
    """(state dict in diffusers' naming with unet./text_encoder. prefixes, kohya network alphas, PEFT metadata), as
    load_lora_weights reads it: diffusers/PEFT and kohya (A1111) layouts."""
    kwargs = {"unet_config": model.unet.config} if model.family == "sdxl" else {}
    try:
        with quiet():
            state, alphas, metadata = mixin(model).lora_state_dict(
                str(Path(path).expanduser()), use_safetensors=True, return_lora_metadata=True, **kwargs)
    except Exception as error:
        raise LoraError(f"the LoRA {path} cannot be read: {first_line(error)}") from None
    parts = ["unet", *encoder_prefixes(model)]
    foreign = [k for k in state if k.split(".")[0] not in parts]
    if foreign:
        raise LoraError(f"the LoRA {path} does not fit model {model.name}: {len(foreign)} of its {len(state)} tensors "
                        f"belong to no part of it (e.g. {foreign[0]}; an SDXL LoRA on an SD model?)")
    return state, alphas, metadata


def part_metadata(metadata: dict | None, prefix: str) -> dict | None:
    """The metadata of one component, or None where it has none (diffusers would build a LoraConfig of nothing)."""
    if metadata and any(k.startswith(f"{prefix}.") for k in metadata):
        return metadata
    return None


def load_adapter(model, path: str, name: str, unet: bool = True) -> tuple[bool, list]:
    """Load a LoRA into the UNet (unless unet=False) and text encoders as peft adapter `name`; (UNet got it,
    indexes of the text encoders that got it). LoraError when it does not fit."""
    state, alphas, metadata = read_lora(model, path)
    loader = mixin(model)
    in_unet, encoders = False, []
    try:
        with quiet():
            if unet and any(k.startswith("unet.") for k in state):
                loader.load_lora_into_unet(state, alphas, model.unet, adapter_name=name,
                                           metadata=part_metadata(metadata, "unet"))
                in_unet = True
                unfuse_adapted_projections(model.unet)
            for index, (prefix, encoder) in enumerate(zip(encoder_prefixes(model), model.text_encoders)):
                if any(k.startswith(f"{prefix}.") for k in state):
                    loader.load_lora_into_text_encoder(state, alphas, encoder, prefix=prefix, adapter_name=name,
                                                       metadata=part_metadata(metadata, prefix))
                    encoders.append(index)
    except Exception as error:
        remove_adapter(model, name, True, range(len(model.text_encoders)))
        raise LoraError(f"the LoRA {path} does not fit model {model.name}: {mismatch(error)}") from None
    if not in_unet and not encoders and unet:
        raise LoraError(f"the LoRA {path} holds no layer of model {model.name}")
    return in_unet, encoders


def remove_adapter(model, name: str, unet: bool, encoders) -> None:
    from diffusers.utils.peft_utils import delete_adapter_layers
    with quiet():
        if unet and name in getattr(model.unet, "peft_config", {}):
            model.unet.delete_adapters([name])
        for index in encoders:
            encoder = model.text_encoders[index]
            if name in (getattr(encoder, "peft_config", None) or {}):
                delete_adapter_layers(encoder, name)


def unet_weights(model, path: str) -> dict:
    """A LoRA's UNet layers as {module: (lora_A, lora_B x scaling)}: what peft adds to each layer's output, with
    the adapter's alphas folded in. diffusers loads it into a weightless (meta) copy of the UNet to say which
    layers, ranks and scalings; the tensors come from the file."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.tuners.lora import LoraLayer

    state, alphas, metadata = read_lora(model, path)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        return {}
    skeleton = meta_unet(model)
    try:
        with quiet():
            mixin(model).load_lora_into_unet(state, alphas, skeleton, adapter_name="probe",
                                             metadata=part_metadata(metadata, "unet"))
    except Exception as error:
        raise LoraError(f"the LoRA {path} does not fit model {model.name}: {mismatch(error)}") from None
    if "lora_A" not in next(iter(unet_state)):
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    weights = {}
    try:
        for module_name, module in skeleton.named_modules():
            if isinstance(module, LoraLayer) and "probe" in module.lora_A:
                a, b = unet_state[f"{module_name}.lora_A.weight"], unet_state[f"{module_name}.lora_B.weight"]
                weights[module_name] = (a, b * module.scaling["probe"])
    except KeyError as error:
        raise LoraError(f"the LoRA {path} has a layout sdbatch cannot put into a compiled UNet's slot (no {error})"
                        ) from None
    finally:
        with quiet():
            skeleton.delete_adapters(["probe"])
    return weights


def meta_unet(model):
    """A weightless copy of the model's UNet (built once), for reading LoRA layouts without touching the real one."""
    if getattr(model, "_lora_skeleton", None) is None:
        from diffusers import UNet2DConditionModel
        with torch.device("meta"):
            model._lora_skeleton = UNet2DConditionModel.from_config(model.unet.config)
    return model._lora_skeleton


def unfuse_adapted_projections(unet) -> None:
    """Attention layers whose Q/K/V projections now carry a LoRA go back to separate projections: the fused matmul
    (fuse_qkv) was built from the plain weights and would skip the LoRA."""
    from diffusers.models.attention_processor import Attention
    for module in unet.modules():
        if isinstance(module, Attention) and getattr(module, "fused_projections", False) and has_adapter(module):
            module.fused_projections = False


# ---------------------------------------------------------------- run-level LoRAs
def fuse_run_loras(model, loras: list[dict]) -> None:
    """Merge the run's LoRAs ([{path, scale}]) into the UNet's and text encoders' weights and drop the adapters,
    so later levers (fused projections, torch.compile) see plain weights. SdbatchError when one does not fit."""
    if not loras:
        return
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, set_adapters_for_text_encoder
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    names, in_unet, in_encoders = [], [], {}
    for i, lora in enumerate(loras):
        name = f"sdbatch_run_{i}"
        try:
            got_unet, encoders = load_adapter(model, lora["path"], name)
        except LoraError as error:
            raise SdbatchError(f"lora[{i}].path={lora['path']}: {error}. Fix or remove this run-level LoRA.") from None
        names.append(name)
        if got_unet:
            in_unet.append((name, lora["scale"]))
        for index in encoders:
            in_encoders.setdefault(index, []).append((name, lora["scale"]))
    with quiet():
        if in_unet:
            model.unet.set_adapters([n for n, _ in in_unet], [s for _, s in in_unet])
            model.unet.fuse_lora(adapter_names=[n for n, _ in in_unet])
            model.unet.unload_lora()
        for index, pairs in in_encoders.items():
            encoder = model.text_encoders[index]
            set_adapters_for_text_encoder([n for n, _ in pairs], encoder, [s for _, s in pairs])
            fuse_text_encoder_lora(encoder, adapter_names=[n for n, _ in pairs])
            recurse_remove_peft_layers(encoder)
            if hasattr(encoder, "peft_config"):
                del encoder.peft_config
            encoder._hf_peft_config_loaded = False
    log.info("fused %d run-level LoRA(s) into the model: %s", len(loras),
             ", ".join(f"{lora['path']} ({lora['scale']:g})" for lora in loras))


# ---------------------------------------------------------------- words
class quiet(warnings.catch_warnings):
    """peft's and diffusers' notes about adapters (several in one model, keys it skipped) stay out of the log."""

    def __enter__(self):
        from transformers.utils import logging as transformers_logging
        result = super().__enter__()
        warnings.simplefilter("ignore")
        self.bars = not transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # "Loading weights" bars of each text-encoder adapter
        self.levels = {}
        for name in ("diffusers", "peft", "transformers"):
            logger = logging.getLogger(name)
            self.levels[name] = logger.level
            logger.setLevel(logging.CRITICAL)
        return result

    def __exit__(self, *exc):
        from transformers.utils import logging as transformers_logging
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        if not self.bars:
            transformers_logging.enable_progress_bar()
        return super().__exit__(*exc)


def mismatch(error: Exception) -> str:
    """What a failed load says, in one line: the first size mismatch (a LoRA of another architecture), or the
    error's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    sizes = [line for line in lines if line.startswith("size mismatch")]
    if sizes:
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        return sizes[0].rstrip(".") + more
    return first_line(error)
