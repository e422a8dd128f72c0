"""The batched denoising loop: one static shape per batch, CFG in one UNet call, one generator per image."""

import inspect
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import diffusers
import torch

from sdbatch.manifest import ImageJob
from sdbatch.models import MAX_PROMPT_CHUNKS, VAE_CHUNK, Conditioning, Model

log = logging.getLogger("sdbatch")
TEXT_CACHE_SIZE = 1024  # distinct prompts kept encoded on the device


@dataclass
class BatchResult:
    pixels: list  # per image: uint8 (H, W, 3) tensor on the CPU, or None when failed
    failures: list  # per image: None, or the reason it failed
    truncated: list  # per image: the prompt was cut to max_prompt_chunks windows of the text encoder
    seconds: dict = field(default_factory=dict)  # text_encode_s, denoise_s, vae_decode_s for the whole batch
    batch_sizes: list = field(default_factory=list)  # per image: images in the UNet batch it ran in


def batch_key(job: ImageJob) -> tuple:
    """Jobs sharing this key can share one static-shape batch."""
    return job.width, job.height, job.steps, job.guidance_scale


def make_scheduler(scheduler_cfg, model_scheduler_config: dict):
    scheduler_class = getattr(diffusers, scheduler_cfg.class_name)
    options = dict(scheduler_cfg.get("options") or {})
    return scheduler_class.from_config({**model_scheduler_config, **options})


class Renderer:
    def __init__(self, model: Model, scheduler_cfg, pad_to: int | None = None, max_prompt_chunks: int = MAX_PROMPT_CHUNKS,
                 adapters=None):
        self.model, self.scheduler_cfg, self.pad_to = model, scheduler_cfg, pad_to
        self.max_prompt_chunks = max_prompt_chunks
        self.adapters = adapters  # lora.Adapters: the per-row LoRAs, switched per batch
        self.max_batch = None  # set after a CUDA out-of-memory error; later batches are cut to it
        self.text_cache: OrderedDict = OrderedDict()
        self.empty_windows: dict = {}  # per LoRA: the encoded empty prompt (long-prompt padding), encoded on first use
        self.adapter = None  # the LoRA of the batch being rendered (its text encodings are its own)
        step_parameters = inspect.signature(make_scheduler(scheduler_cfg, model.scheduler_config).step).parameters
        self.step_takes_generator = "generator" in step_parameters

    def render(self, jobs: list[ImageJob]) -> BatchResult:
        """Render jobs of one batch_key; on CUDA out-of-memory, halve the batch (for good) and retry."""
        step = self.max_batch
        if step and len(jobs) > step:
            return merge([self.render(jobs[i:i + step]) for i in range(0, len(jobs), step)])
        try:
            return self._render(jobs)
        except torch.cuda.OutOfMemoryError:
            if len(jobs) == 1:
                raise
            torch.cuda.empty_cache()
            self.max_batch = (len(jobs) + 1) // 2
            log.warning("CUDA out of memory at batch %d: rendering batches of %d from now on", len(jobs), self.max_batch)
            return self.render(jobs)

    @torch.no_grad()
    def _render(self, jobs: list[ImageJob]) -> BatchResult:
        model, first = self.model, jobs[0]
        if self.adapters is not None:
            self.adapters.activate(first)  # a batch never mixes LoRAs (batch_key)
        self.adapter = first.adapter
        pad_to = min(self.pad_to, self.max_batch or self.pad_to) if self.pad_to else 0
        padded = jobs + [first] * max(0, pad_to - len(jobs))  # static shape: pad, never recompile
        clock = Stopwatch(model.device)
        cond, uncond = self.text_conditioning(padded)
        seconds = {"text_encode_s": clock.lap()}
        generators = [torch.Generator().manual_seed(j.seed) for j in padded]  # drawn from as diffusers does
        latents = initial_latents(padded, model, generators)
        latents = self.denoise(latents, cond, uncond, first.steps, first.guidance_scale, first.width, first.height,
                               generators)
        seconds["denoise_s"] = clock.lap()
        pixels, failures = decode(model, latents if self.pad_to else latents[:len(jobs)])  # padded: one shape
        pixels, failures = pixels[:len(jobs)], failures[:len(jobs)]
        seconds["vae_decode_s"] = clock.lap()
        return BatchResult(pixels, failures, cond.truncated[:len(jobs)], seconds, [len(padded)] * len(jobs))

    def batch_key(self, job: ImageJob) -> tuple:
        """batch_key plus the job's LoRA (a batch never mixes adapters) and the text windows it fills: batched only
        with jobs of the same count, an image's text conditioning never gets padding for a longer prompt of another
        row (so it does not depend on its batch)."""
        return (*batch_key(job), job.adapter, self.text_chunks(job))

    def text_chunks(self, job: ImageJob) -> int:
        return self.windows(job.prompt, job.negative_prompt, job.guidance_scale)

    def windows(self, prompt: str, negative_prompt: str, guidance_scale: float) -> int:
        """77-token windows of an image's conditioning: its prompt's, or its negative prompt's when that is longer
        (and guidance uses it), at most max_prompt_chunks."""
        chunks = self.model.prompt_chunks(prompt)
        if guidance_scale > 1:
            chunks = max(chunks, self.model.prompt_chunks(negative_prompt))
        return min(chunks, self.max_prompt_chunks)

    def text_conditioning(self, jobs: list[ImageJob]) -> tuple[Conditioning, Conditioning | None]:
        """Prompt and negative-prompt conditioning of one batch, padded to one length (the negative only with guidance)."""
        prompts = [j.prompt for j in jobs]
        cond = self.conditioning(prompts)
        if jobs[0].guidance_scale <= 1:
            return cond, None
        uncond = self.conditioning([j.negative_prompt for j in jobs], negative=True, chunks=max(cond.chunks))
        if max(uncond.chunks) > max(cond.chunks):  # a negative prompt longer than every prompt
            cond = self.conditioning(prompts, chunks=max(uncond.chunks))
        return cond, uncond

    def conditioning(self, texts: list[str], negative: bool = False, chunks: int = 1) -> Conditioning:
        """Embeddings for texts, encoding each distinct text once and keeping recent ones on the device.

        Texts are padded with the encoded empty window to one length, the longest among them and at least `chunks`
        windows (as A1111 pads); its `chunks` are then that length for every text.
        """
        zero_empty = negative and self.model.family == "sdxl"
        keys = [(self.adapter, zero_empty, t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.text_cache))
        if missing:
            encoded = self.model.encode([t for _, _, t in missing], zero_empty=zero_empty, max_chunks=self.max_prompt_chunks)
            window = self.model.window
            for i, key in enumerate(missing):
                pooled = encoded.pooled[i] if encoded.pooled is not None else None
                self.text_cache[key] = (encoded.embeds[i, :encoded.chunks[i] * window], pooled, encoded.truncated[i])
        for key in keys:
            self.text_cache.move_to_end(key)
        rows = [self.text_cache[k] for k in keys]
        while len(self.text_cache) > max(TEXT_CACHE_SIZE, len(keys)):
            self.text_cache.popitem(last=False)
        length = max([chunks * self.model.window, *(r[0].shape[0] for r in rows)])
        embeds = torch.stack([self.pad(row[0], length, zeros=zero_empty and text == "") for row, text in zip(rows, texts)])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return Conditioning(embeds, pooled, [r[2] for r in rows], [length // self.model.window] * len(rows))

    def pad(self, embeds: torch.Tensor, length: int, zeros: bool) -> torch.Tensor:
        """embeds followed by encoded empty windows (zeros for an SDXL empty negative, which is zeros) up to length."""
        if embeds.shape[0] == length:
            return embeds
        if zeros:
            return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])])
        if self.adapter not in self.empty_windows:
            self.empty_windows[self.adapter] = self.model.encode([""]).embeds[0]
        repeats = (length - embeds.shape[0]) // self.model.window
        return torch.cat([embeds, self.empty_windows[self.adapter].repeat(repeats, 1)])

    def denoise(self, latents, cond, uncond, steps, guidance_scale, width, height, generators):
        model = self.model
        scheduler = make_scheduler(self.scheduler_cfg, model.scheduler_config)
        scheduler.set_timesteps(steps, device=model.device)
        latents = latents * scheduler.init_noise_sigma
        guided = guidance_scale > 1
        embeds = torch.cat([uncond.embeds, cond.embeds]) if guided else cond.embeds
        pooled = (torch.cat([uncond.pooled, cond.pooled]) if guided else cond.pooled) if cond.pooled is not None else None
        added = model.added_conditioning(pooled, width, height)
        step_kwargs = {"generator": generators} if self.step_takes_generator else {}
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            noise = model.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
            if guided:
                noise_uncond, noise_text = noise.chunk(2)
                noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        return latents


def initial_latents(jobs: list[ImageJob], model: Model, generators: list) -> torch.Tensor:
    """Each image's starting noise from its own CPU generator (as diffusers draws it for a list of generators)."""
    factor = model.vae_scale_factor
    shape = (1, model.unet.config.in_channels, jobs[0].height // factor, jobs[0].width // factor)
    noise = [torch.randn(shape, generator=g, dtype=model.dtype) for g in generators]
    return torch.cat(noise).to(model.device)


def decode(model: Model, latents: torch.Tensor):
    """VAE decode in chunks; returns uint8 images on the CPU and a failure reason per image (NaN, all black)."""
    vae = model.vae
    hint = " (fp16 overflow in the VAE? try vae_dtype=bf16 or fp32)" if vae.dtype == torch.float16 else ""
    pixels, failures = [], []
    for chunk in latents.split(VAE_CHUNK):
        images = vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        finite = torch.isfinite(images).flatten(1).all(dim=1).tolist()
        images = (images / 2 + 0.5).clamp(0, 1).float()
        images = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        for image, ok in zip(images, finite):
            reason = None if ok else f"non-finite values (NaN/inf) in the decoded image{hint}"
            if ok and int(image.max()) == 0:
                reason = f"all-black image{hint}"
            pixels.append(None if reason else image)
            failures.append(reason)
    return pixels, failures


def merge(results: list[BatchResult]) -> BatchResult:
    seconds = {k: sum(r.seconds[k] for r in results) for k in results[0].seconds}
    return BatchResult(sum((r.pixels for r in results), []), sum((r.failures for r in results), []),
                       sum((r.truncated for r in results), []), seconds, sum((r.batch_sizes for r in results), []))


class Stopwatch:
    """Stage timer: synchronises the device before reading the clock, so GPU work lands in the right stage."""

    def __init__(self, device: torch.device):
        self.device, self.last = device, time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed
