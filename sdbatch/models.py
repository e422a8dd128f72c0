"""Model components and text conditioning: built-in tiny and random architectures, diffusers folders, single-file
checkpoints; how prompts of any length become SD / SDXL UNet conditioning; dummy UNet/VAE calls and fused projections.

A family (SD, SDXL) says how prompts become UNet conditioning; everything else is shared.
"""

import gzip
import json
import math
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdbatch import SdbatchError
from sdbatch.weights import (ARCH_DIR, RANDOM_REVISION, TINY_REVISION, Weights, arch_info, arch_name, known_archs,
                             locate_weights, model_revision, weights_revision)

__all__ = ["Model", "Conditioning", "load_model", "model_revision", "tiny_model", "random_model", "TINY_REVISION"]

TINY_SEED = 1234
VAE_CHUNK = 8  # images per VAE decode call: bounds memory and stays clear of int32 indexing limits
MAX_PROMPT_CHUNKS = 3  # the default of conf/config.yaml's max_prompt_chunks
VOCAB_FILE = Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
SD_SCHEDULER_CONFIG = {  # Stable Diffusion's training schedule, used when a model folder has none
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True,
}


@dataclass
class Conditioning:
    embeds: torch.Tensor  # (n, chunks * 77, dim)
    pooled: torch.Tensor | None  # (n, dim) for SDXL
    truncated: list[bool]
    chunks: list[int] = field(default_factory=list)  # per text: the 77-token windows it fills, before any padding


@dataclass
class Model:
    name: str
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizers: list
    text_encoders: list
    scheduler_config: dict
    revision: str  # what identifies the weights ("random:<arch>", or where they are + a content fingerprint)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def window(self) -> int:
        """Tokens per text-encoder call (77): BOS, up to 75 prompt tokens, EOS and padding."""
        return self.tokenizers[0].model_max_length

    def to(self, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype | None = None) -> "Model":
        """Move to the device in dtype; the VAE in vae_dtype, or None: dtype, unless that overflows (see below)."""
        self.device, self.dtype = device, dtype
        self.unet.to(device, dtype)
        self.vae.to(device, vae_dtype or (torch.float32 if self.vae_needs_fp32(dtype) else dtype))
        for encoder in self.text_encoders:
            encoder.to(device, dtype)
        return self

    def vae_needs_fp32(self, dtype: torch.dtype) -> bool:
        # SDXL's VAE overflows in fp16; diffusers' SDXL pipeline upcasts it the same way (its SD pipeline does not).
        return self.family == "sdxl" and dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))

    def optimise(self, fuse_qkv: bool, fp8: bool, channels_last: bool, compile_mode: str | None,
                 compile_scope: str = "model", saved_compile: tuple[Path, dict] | None = None) -> None:
        """Speed levers for fixed-shape GPU batches; call after the attention processors are set. saved_compile:
        (folder, identity) to compile the whole model once and load it in later processes (sdbatch.aot)."""
        if fuse_qkv:
            fuse_projections(self)
        if fp8:  # after fusing, so that the fused projections are converted too
            from sdbatch.fp8 import convert_unet
            convert_unet(self.unet)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile_mode and compile_scope == "blocks":
            compile_blocks([*self.unet.modules(), *self.vae.decoder.modules()], compile_mode)
        elif compile_mode and saved_compile:
            from sdbatch import aot
            from torch._inductor import list_mode_options
            aot.compile_model(self, *saved_compile, unet_options=channels_last_convolutions(compile_mode),
                              vae_options=list_mode_options(compile_mode))
        elif compile_mode:
            self.unet = torch.compile(self.unet, dynamic=False, options=channels_last_convolutions(compile_mode))
            self.vae.decode = torch.compile(self.vae.decode, mode=compile_mode, dynamic=False)

    def prompt_chunks(self, text: str) -> int:
        """How many 75-token chunks the text needs (before any cut to max_prompt_chunks); 1 for a text that fits."""
        return max(1, math.ceil(len(prompt_tokens(self.tokenizers[0], [text])[0]) / (self.window - 2)))

    @torch.no_grad()
    def encode(self, texts: list[str], zero_empty: bool = False, max_chunks: int = 1, chunks: int = 1) -> Conditioning:
        """Text embeddings as diffusers' pipelines compute them, for prompts of any length as A1111 does.

        The tokens go in chunks of 75, each encoded between BOS and EOS as one 77-token window, and the windows'
        hidden states are concatenated; a text that fits one window gets exactly diffusers' embeddings. A text
        needing more than max_chunks windows is cut there (flagged truncated). Every text is padded with encoded
        empty windows to the longest (at least `chunks`), since a UNet batch shares one sequence length. SDXL's
        pooled embedding is that of the first window, as in A1111.
        """
        tokens = [prompt_tokens(tokenizer, texts) for tokenizer in self.tokenizers]
        windows = [[token_windows(tokenizer, ids, max_chunks) for ids in per_text]
                   for tokenizer, per_text in zip(self.tokenizers, tokens)]
        counts = [max(len(rows[i]) for rows in windows) for i in range(len(texts))]
        total = max([chunks, *counts])
        hidden, pooled = [], None
        for tokenizer, encoder, rows in zip(self.tokenizers, self.text_encoders, windows):
            empty = window_ids(tokenizer, [])
            ids = torch.tensor([w + [empty] * (total - len(w)) for w in rows], device=self.device).flatten(0, 1)
            if self.family == "sd":
                hidden.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0].unflatten(0, (len(texts), total))[:, 0]  # the last encoder's projected pooled output
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1).unflatten(0, (len(texts), total)).flatten(1, 2)
        if zero_empty and self.family == "sdxl":  # an empty negative prompt means zeros (force_zeros_for_empty_prompt)
            empty = torch.tensor([t == "" for t in texts], device=self.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        truncated = [len(ids) > max_chunks * (self.window - 2) for ids in tokens[0]]
        return Conditioning(embeds, pooled, truncated, counts)

    def added_conditioning(self, pooled: torch.Tensor | None, width: int, height: int) -> dict | None:
        """SDXL's size conditioning: original size, crop top-left, target size."""
        if self.family == "sd":
            return None
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}


def prompt_tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, without BOS/EOS and uncut."""
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids


def token_windows(tokenizer, ids: list[int], max_chunks: int) -> list[list[int]]:
    size = tokenizer.model_max_length - 2
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)][:max_chunks] or [[]]
    return [window_ids(tokenizer, chunk) for chunk in chunks]


def window_ids(tokenizer, chunk: list[int]) -> list[int]:
    """BOS, the chunk, EOS, padding: what the tokenizer gives for a text that fits (the empty chunk for [])."""
    ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(ids))


# ---------------------------------------------------------------- dummy calls and fused projections
def random_unet_inputs(model: Model, batch: int, width: int, height: int):
    """Random UNet inputs at the run's real shapes: latents, text embeddings, SDXL's added conditioning."""
    unet, factor, device, dtype = model.unet, model.vae_scale_factor, model.device, model.dtype
    x = torch.randn(batch, unet.config.in_channels, height // factor, width // factor, device=device, dtype=dtype)
    embeds = torch.randn(batch, model.window, unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled = None
    if model.family == "sdxl":
        pooled = torch.randn(batch, model.text_encoders[-1].config.projection_dim, device=device, dtype=dtype)
    return x, embeds, model.added_conditioning(pooled, width, height)


@torch.no_grad()
def dummy_unet_call(model: Model, batch: int, width: int, height: int) -> None:
    """One UNet call at the run's real shapes (for attention shape discovery and warm-up)."""
    x, embeds, added = random_unet_inputs(model, batch, width, height)
    model.unet(x, torch.tensor(999, device=model.device), encoder_hidden_states=embeds, added_cond_kwargs=added)


@torch.no_grad()
def dummy_vae_call(model: Model, batch: int, width: int, height: int) -> None:
    factor = model.vae_scale_factor
    z = torch.randn(batch, model.vae.config.latent_channels, height // factor, width // factor,
                    device=model.device, dtype=model.vae.dtype)
    model.vae.decode(z)


REPEATED_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")


def compile_blocks(modules, compile_mode: str) -> None:
    """torch.compile each repeated block on its own ("regional compilation"): blocks of one class and shape share
    one traced graph, so a new process re-traces SD1.5's UNet and VAE as 19 graphs for 38 blocks (SDXL: 15 for 28)
    instead of one whole-model graph, at the price of no fusion across blocks; the rest runs eagerly."""
    blocks = [module for module in modules if type(module).__name__ in REPEATED_BLOCKS]
    # Every block shape is one Dynamo cache entry of nn.Module's shared call code: room for all of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(blocks))
    for block in blocks:
        block.compile(mode=compile_mode, dynamic=False)


def channels_last_convolutions(compile_mode: str) -> dict:
    """Inductor's options for compile_mode, with its channels-last convolutions forced on. Inductor gives them up in
    a graph of 300 nodes or more per convolution: SDXL's fp8 UNet is one (15,852 nodes for 51 convolutions), and
    then cuDNN converts each convolution's input and output, 4.7% of its step on an H100."""
    from torch._inductor import list_mode_options
    return {**list_mode_options(compile_mode), "force_layout_optimization": True}


def fuse_projections(model: Model) -> None:
    """Fuse Q/K/V (self-attention) and K/V (cross-attention) weights into single matmuls; not where a projection
    carries a LoRA adapter (the fused matmul would skip it)."""
    for module in list(model.unet.modules()) + list(model.vae.modules()):
        if isinstance(module, Attention) and not has_adapter(module):
            module.fuse_projections(fuse=True)
            module.fused_projections = True


def has_adapter(attention: Attention) -> bool:
    """A peft layer (LoRA) wraps one of the attention's Q/K/V projections."""
    return any(hasattr(getattr(attention, name, None), "base_layer") for name in ("to_q", "to_k", "to_v"))


# ---------------------------------------------------------------- loading
def load_model(cfg) -> Model:
    """Build or load the model named by the `model` config group (on the CPU, in the weights' dtype or fp32)."""
    if cfg.random_weights and cfg.name == "tiny":
        return tiny_model(cfg.family)
    if cfg.random_weights:
        return random_model(cfg.name)
    weights = locate_weights(cfg)
    return single_file_model(cfg, weights) if weights.single_file else pretrained_model(cfg, weights)


def build(arch: str):
    """UNet, VAE and text encoders of a built-in architecture, on the current default device (random weights)."""
    unet = UNet2DConditionModel.from_config(arch_config(arch, "unet"))
    vae = AutoencoderKL.from_config(arch_config(arch, "vae"))
    encoders = [CLIPTextModel(CLIPTextConfig(**arch_config(arch, "text_encoder")))]
    if (ARCH_DIR / arch / "text_encoder_2.json").exists():
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**arch_config(arch, "text_encoder_2"))))
    return unet, vae, encoders


def arch_config(arch: str, part: str) -> dict:
    return json.loads((ARCH_DIR / arch / f"{part}.json").read_text())


def arch_model(name: str, arch: str, unet, vae, encoders, revision: str) -> Model:
    tokenizers = [clip_tokenizer(pad) for pad in arch_info(arch)["pad_tokens"]]
    return Model(name, arch_info(arch)["family"], unet, vae, tokenizers, encoders, arch_config(arch, "scheduler"), revision)


def tiny_model(family: str = "sd") -> Model:
    """SD-architecture model small enough for a CPU; the same weights on every machine (fixed seed, built on the CPU)."""
    torch.manual_seed(TINY_SEED)
    with torch.device("cpu"):
        parts = build(f"tiny-{family}")
    return arch_model("tiny", f"tiny-{family}", *parts, TINY_REVISION[family])


def random_model(arch: str) -> Model:
    """A full-size architecture with random weights (for speed work: speed does not depend on weights)."""
    if arch not in known_archs():
        raise SdbatchError(f"No built-in architecture '{arch}' for model.random_weights=true "
                           f"(known: {', '.join(known_archs())}).")
    torch.manual_seed(TINY_SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialise where it will run: much faster on a GPU
    with torch.device(device):
        parts = build(arch)
    return arch_model(arch, arch, *parts, RANDOM_REVISION.format(arch=arch))


# ---------------------------------------------------------------- tokenizers
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The standard CLIP tokenizer of SD and SDXL, from the BPE vocabulary sdbatch ships (single-file checkpoints
    and random weights carry none). OpenCLIP encoders (SD 2, SDXL's second) pad with "!", as diffusers' do."""
    vocab, merges = clip_vocabulary()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(vocab)
        Path(folder, "merges.txt").write_text(merges)
        return CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", pad_token=pad_token, model_max_length=77)


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[str, str]:
    """vocab.json and merges.txt for CLIPTokenizer, converted from open_clip's bpe_simple_vocab_16e6.txt.gz the way
    CLIP's own tokenizer reads it (byte symbols, byte</w> symbols, one symbol per merge, then the two specials)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not VOCAB_FILE.exists():
        raise SdbatchError(
            f"sdbatch's copy of CLIP's vocabulary ({VOCAB_FILE}) is missing, and this model has no tokenizer of its "
            f"own (single-file checkpoints and random weights carry none). Reinstall sdbatch, or point model.path "
            f"at a diffusers folder with tokenizer/.")
    merges = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({token: i for i, token in enumerate(vocab)}), "#version: 0.2\n" + "\n".join(merges) + "\n"


# ---------------------------------------------------------------- real weights
def pretrained_model(cfg, weights: Weights) -> Model:
    """Load a diffusers-format folder (or hub snapshot already in the local cache); safetensors only."""
    folder, sdxl = str(weights.path), cfg.family == "sdxl"
    load = {"use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **load)
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **load)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **load))
    scheduler_file = Path(folder, "scheduler", "scheduler_config.json")
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else dict(SD_SCHEDULER_CONFIG)
    return Model(cfg.name, cfg.family, unet, vae, tokenizers, encoders, scheduler_config, weights_revision(weights))


def single_file_model(cfg, weights: Weights) -> Model:
    """A single-file checkpoint in the original (A1111/civitai) layout, on the architecture sdbatch ships for it.

    diffusers' single-file converters rename the keys; the modules are built on the meta device from the shipped
    configs and take the checkpoint's tensors as they are (no random init, no hub). Tokenizers: sdbatch's CLIP vocabulary.
    """
    from diffusers.loaders import single_file_utils as convert
    from safetensors.torch import load_file

    arch, path = arch_name(cfg), weights.path
    checkpoint = load_file(path)
    with torch.device("meta"):
        unet, vae, encoders = build(arch)
    assign(unet, convert.convert_ldm_unet_checkpoint(checkpoint, unet.config), "UNet", path, arch)
    assign(vae, convert.convert_ldm_vae_checkpoint(checkpoint, vae.config), "VAE", path, arch)
    for i, (encoder, state) in enumerate(zip(encoders, text_encoder_states(checkpoint, encoders, weights.layout))):
        assign(encoder, state, "text encoder" + (f" {i + 1}" if len(encoders) > 1 else ""), path, arch)
    del checkpoint
    return arch_model(cfg.name, arch, unet, vae, encoders, weights_revision(weights))


def text_encoder_states(checkpoint: dict, encoders: list, layout: str) -> list[dict]:
    """The text encoders' weights in transformers' names: CLIP ViT-L as stored (SD 1, SDXL's first), OpenCLIP
    (SD 2, SDXL's second) converted by diffusers."""
    from diffusers.loaders import single_file_utils as convert

    if layout == "sd2":
        states = [convert.convert_open_clip_checkpoint(encoders[0], checkpoint, prefix="cond_stage_model.model.")]
    else:
        states = [convert.convert_ldm_clip_checkpoint(checkpoint)]
    if layout == "sdxl":
        prefix = "conditioner.embedders.1.model."
        states.append(convert.convert_open_clip_checkpoint(encoders[1], checkpoint, prefix=prefix))
    return [state if hasattr(encoder, "text_model") else {k.removeprefix("text_model."): v for k, v in state.items()}
            for encoder, state in zip(encoders, states)]  # transformers >= 5.6 flattened CLIPTextModel


def assign(module: torch.nn.Module, state: dict, part: str, path: Path, arch: str) -> None:
    """Put converted checkpoint tensors into a module built on the meta device; every weight must be there."""
    try:
        missing, _ = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # size mismatches: the file is another architecture
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise SdbatchError(f"{path} does not fit the {arch} architecture's {part}: {first.strip()}. Choose the model= "
                           f"that matches the checkpoint.") from None
    if missing:
        raise SdbatchError(f"{path} lacks {len(missing)} of the {arch} architecture's {part} weights (e.g. "
                           f"{missing[0]}): it is not a complete {arch} checkpoint. Choose the model= that matches it.")
    for sub in module.modules():  # CLIP's position ids are a non-persistent buffer: no checkpoint holds them
        ids = sub._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            sub.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(ids.shape), persistent=False)
    module.eval()
