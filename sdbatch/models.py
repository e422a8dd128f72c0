"""Model components: the built-in tiny model, full-size random architectures, and real weights via from_pretrained.

A family (SD, SDXL) says how prompts become UNet conditioning; everything else is shared.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdbatch import SdbatchError

ARCH_DIR = Path(__file__).parent / "arch"
TINY_SEED = 1234
SD_SCHEDULER_CONFIG = {  # Stable Diffusion's training schedule, used when a model folder has none
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "skip_prk_steps": True,
}


@dataclass
class Conditioning:
    embeds: torch.Tensor  # (n, tokens, dim)
    pooled: torch.Tensor | None  # (n, dim) for SDXL
    truncated: list[bool]


@dataclass
class Model:
    name: str
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizers: list
    text_encoders: list
    scheduler_config: dict
    revision: str  # what identifies the weights (path or "random:<arch>")
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Model":
        self.device, self.dtype = device, dtype
        self.unet.to(device, dtype)
        vae_dtype = torch.float32 if self.vae_needs_fp32(dtype) else dtype
        self.vae.to(device, vae_dtype)
        for encoder in self.text_encoders:
            encoder.to(device, dtype)
        return self

    def vae_needs_fp32(self, dtype: torch.dtype) -> bool:
        # SDXL's VAE overflows in fp16; diffusers' SDXL pipeline upcasts it the same way (its SD pipeline does not).
        return self.family == "sdxl" and dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))

    def optimise(self, fuse_qkv: bool, channels_last: bool, compile_mode: str | None) -> None:
        """Speed levers for fixed-shape GPU batches; call after the attention processors are set."""
        if fuse_qkv:
            from sdbatch.attention import fuse_projections
            fuse_projections(self)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile_mode:
            self.unet = torch.compile(self.unet, mode=compile_mode, dynamic=False)
            self.vae.decode = torch.compile(self.vae.decode, mode=compile_mode, dynamic=False)

    @torch.no_grad()
    def encode(self, texts: list[str], zero_empty: bool = False) -> Conditioning:
        """Text embeddings for a list of prompts, exactly as diffusers' pipelines compute them."""
        truncated = [_too_long(self.tokenizers[0], text) for text in texts]
        if self.family == "sd":
            ids = _token_ids(self.tokenizers[0], texts).to(self.device)
            return Conditioning(self.text_encoders[0](ids)[0], None, truncated)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(_token_ids(tokenizer, texts).to(self.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        if zero_empty:  # SDXL: an empty negative prompt means zeros (force_zeros_for_empty_prompt)
            empty = torch.tensor([t == "" for t in texts], device=self.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Conditioning(embeds, pooled, truncated)

    def added_conditioning(self, pooled: torch.Tensor | None, width: int, height: int) -> dict | None:
        """SDXL's size conditioning: original size, crop top-left, target size."""
        if self.family == "sd":
            return None
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.repeat(pooled.shape[0], 1)}


def _token_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _too_long(tokenizer, text: str) -> bool:
    return len(tokenizer(text, truncation=False).input_ids) > tokenizer.model_max_length


def model_revision(cfg) -> str:
    """What identifies the weights, known before loading them (part of every image's content key)."""
    if cfg.random_weights:
        return f"random:tiny-{cfg.family}" if cfg.name == "tiny" else f"random:{cfg.name}"
    return str(cfg.path)


def load_model(cfg) -> Model:
    """Build or load the model named by the `model` config group (on the CPU, in fp32)."""
    if cfg.random_weights and cfg.name == "tiny":
        return tiny_model(cfg.family)
    if cfg.random_weights:
        return random_model(cfg.name)
    return pretrained_model(cfg)


# ---------------------------------------------------------------- tiny, random weights
def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token, generated with no download."""
    import tempfile

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", model_max_length=77)


def _tiny_text_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
                          eos_token_id=513, pad_token_id=513, projection_dim=32 if projection else 512)


def tiny_model(family: str = "sd") -> Model:
    """SD-architecture model small enough for a CPU; the same weights on every machine (fixed seed)."""
    torch.manual_seed(TINY_SEED)
    sdxl = family == "sdxl"
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if sdxl else 32, attention_head_dim=8,
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32} if sdxl else {}),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    tokenizers = [tiny_tokenizer()]
    encoders = [CLIPTextModel(_tiny_text_config(False))]
    if sdxl:
        tokenizers.append(tiny_tokenizer())
        encoders.append(CLIPTextModelWithProjection(_tiny_text_config(True)))
    return Model("tiny", family, unet, vae, tokenizers, encoders, dict(SD_SCHEDULER_CONFIG), f"random:tiny-{family}")


def random_model(arch: str) -> Model:
    """A full-size architecture with random weights (for speed work: speed does not depend on weights)."""
    folder = ARCH_DIR / arch
    if not folder.is_dir():
        known = sorted(p.name for p in ARCH_DIR.iterdir() if p.is_dir()) if ARCH_DIR.is_dir() else []
        raise SdbatchError(f"No built-in architecture '{arch}' for model.random_weights=true (known: {', '.join(known)}).")

    def config(name):
        return json.loads((folder / f"{name}.json").read_text())

    torch.manual_seed(TINY_SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialise where it will run: much faster on a GPU
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        encoders = [CLIPTextModel(CLIPTextConfig(**config("text_encoder")))]
        if (folder / "text_encoder_2.json").exists():
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))))
    tokenizers = [tiny_tokenizer() for _ in encoders]  # no real vocabulary offline; ids stay in range
    family = "sdxl" if len(encoders) == 2 else "sd"
    return Model(arch, family, unet, vae, tokenizers, encoders, config("scheduler"), f"random:{arch}")


# ---------------------------------------------------------------- real weights
COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def pretrained_model(cfg) -> Model:
    """Load a diffusers-format folder (or hub id already in the local cache); safetensors only."""
    folder = _resolve_folder(cfg)
    _refuse_pickle(folder)
    sdxl = cfg.family == "sdxl"
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
    return Model(cfg.name, cfg.family, unet, vae, tokenizers, encoders, scheduler_config, str(cfg.path))


def _resolve_folder(cfg) -> str:
    path = str(cfg.path) if cfg.path else ""
    if path and os.path.isdir(path):
        return path
    if path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        try:  # a hub id that is already in the local Hugging Face cache
            from huggingface_hub import snapshot_download
            return snapshot_download(path, local_files_only=True)
        except Exception:
            pass
    raise SdbatchError(
        f"The weights for model={cfg.name} were not found at '{path}' (not a local folder, and not in the "
        f"Hugging Face cache; sdbatch does not download): pass model.path=/path/to/a/diffusers/folder with "
        f"safetensors weights, or use model=tiny to try sdbatch without weights.")


def _refuse_pickle(folder: str) -> None:
    for name in COMPONENT_FOLDERS:
        part = Path(folder, name)
        if not part.is_dir():
            continue
        files = [p.name for p in part.iterdir()]
        pickles = [f for f in files if f.endswith((".bin", ".ckpt", ".pt", ".pth"))]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise SdbatchError(
                f"{part} holds only pickle weights ({', '.join(sorted(pickles))}); sdbatch loads safetensors only, "
                f"because pickle files can run code when loaded. Convert them to .safetensors (diffusers' "
                f"save_pretrained(..., safe_serialization=True) does) and point model.path at that folder.")
