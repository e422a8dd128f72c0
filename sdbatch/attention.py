"""Attention backends as one diffusers attention processor that dispatches the core softmax(QK^T)V per shape.

Each backend is a function attend(q, k, v) on (batch, tokens, heads, head_dim) tensors. The processor does the
projections once; which backend runs for each attention shape is decided before rendering (`auto` times them).
"""

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sdbatch import SdbatchError

log = logging.getLogger("sdbatch")
MAX_BATCH_HEADS = 65535  # the CUDA kernels fail with "invalid configuration argument" at batch*heads >= 65536


# ---------------------------------------------------------------- backends: (B, N, H, D) in, (B, N, H, D) out
def vanilla(q, k, v, options=None):
    """The materialised softmax(QK^T)V, as attention ran before memory-efficient kernels."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2)


SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def sdpa(q, k, v, options=None):
    kernel = (options or {}).get("kernel", "auto")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kernel == "auto":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, SDPA_KERNELS[kernel])):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def xformers(q, k, v, options=None):
    import xformers.ops as xops
    return xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous(), op=_xformers_op(options))


def _xformers_op(options):
    import xformers.ops.fmha as fmha
    op = (options or {}).get("op", "auto")
    return {"auto": None, "cutlass": fmha.MemoryEfficientAttentionCutlassOp,
            "flash": fmha.MemoryEfficientAttentionFlashAttentionOp}[op]


BACKENDS = {"xformers": xformers, "sdpa": sdpa, "vanilla": vanilla}


def split_attend(fn, q, k, v, options):
    """Run fn in batch chunks small enough that batch*heads stays under the kernels' grid limit."""
    chunk = max(1, MAX_BATCH_HEADS // q.shape[2])
    if q.shape[0] <= chunk:
        return fn(q, k, v, options)
    return torch.cat([fn(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk], options)
                      for i in range(0, q.shape[0], chunk)])


# ---------------------------------------------------------------- the processor
class DispatchProcessor:
    """diffusers attention processor: projections as AttnProcessor2_0, core attention by the chosen backend."""

    def __init__(self, choice: "Choice"):
        self.choice = choice

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, heads = query.shape[0], attn.heads
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads) for t in (query, key, value))
        name, options = self.choice.backend_for(q.shape, k.shape[1])
        out = split_attend(BACKENDS[name], q, k, v, options).reshape(batch, -1, query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class Choice:
    """Which backend runs for each attention shape (batch, q tokens, kv tokens, heads, head_dim)."""

    def __init__(self, default: str, options: dict | None = None, per_shape: dict | None = None):
        self.default, self.options, self.per_shape = default, options or {}, per_shape or {}

    def backend_for(self, q_shape, kv_tokens):
        key = (q_shape[1], kv_tokens, q_shape[2], q_shape[3])
        return self.per_shape.get(key, self.default), self.options

    @property
    def label(self) -> str:
        """What ran, for the ledger's attention_backend column."""
        names = sorted(set(self.per_shape.values()) | ({self.default} if not self.per_shape else set()))
        return "+".join(names)

    @property
    def detail(self) -> str:
        if self.per_shape:
            return "; ".join(f"q{q} kv{kv} h{h}x{d}: {name}" for (q, kv, h, d), name in sorted(self.per_shape.items()))
        return ", ".join(f"{k}={v}" for k, v in self.options.items()) or self.default


def apply(model, choice: Choice) -> None:
    processor = DispatchProcessor(choice)
    model.unet.set_attn_processor(processor)
    model.vae.set_attn_processor(processor)


# ---------------------------------------------------------------- choosing and checking backends
def choose(cfg, model, device: torch.device, dtype: torch.dtype, batch_size: int, width: int, height: int) -> Choice:
    """The backend choice for this run; stops with a plain-words error when the asked-for backend cannot run."""
    options = {k: v for k, v in cfg.items() if k != "name"}
    if cfg.name == "auto":
        return choose_auto(model, device, dtype, batch_size, width, height)
    if cfg.name not in BACKENDS:
        raise SdbatchError(f"Unknown attention backend '{cfg.name}': choose one of auto, {', '.join(BACKENDS)}.")
    problem = why_not(cfg.name, device, dtype, options)
    if problem:
        raise SdbatchError(problem)
    return Choice(cfg.name, options)


def why_not(name: str, device: torch.device, dtype: torch.dtype, options: dict | None = None) -> str | None:
    """None if the backend runs a smoke call on this device and dtype, else the reason in plain words."""
    if name == "xformers":
        problem = _xformers_problem(device)
        if problem:
            return problem
    q = torch.randn(2, 64, 8, 40, device=device, dtype=dtype)
    try:
        out = BACKENDS[name](q, q, q, options)
        if not torch.isfinite(out).all():
            return f"attention={name} produced non-finite values in its smoke test on {device} ({dtype})."
    except Exception as error:  # any failure here means "can't run"; the message carries the library's reason
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"attention={name} cannot run on {device} ({dtype}): {first_line}. Use attention=auto or attention=sdpa."
    return None


def _xformers_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return ("attention=xformers needs a CUDA GPU: xformers' memory_efficient_attention has no CPU kernel, and "
                f"this run is on {device}. Use attention=sdpa or attention=auto here.")
    try:
        import xformers
        import xformers._cpp_lib as cpp
    except ImportError as error:
        return f"attention=xformers needs the xformers package ({error}). Install it, or use attention=sdpa or attention=auto."
    if cpp._cpp_library_load_exception is not None:
        built_for = " ".join(str(cpp._cpp_library_load_exception).split())
        return (f"attention=xformers cannot run: xformers {xformers.__version__}'s compiled extension does not match "
                f"this torch {torch.__version__} ({built_for}). Install an xformers built for torch "
                f"{torch.__version__} (scripts/gpu/setup.sh builds one from source), or use attention=sdpa or attention=auto.")
    return None


def choose_auto(model, device, dtype, batch_size, width, height) -> Choice:
    runnable = [name for name in BACKENDS if why_not(name, device, dtype) is None]
    skipped = [name for name in BACKENDS if name not in runnable]
    if device.type != "cuda":
        return Choice("sdpa" if "sdpa" in runnable else runnable[0])
    for name in skipped:
        log.warning("attention=auto: leaving out %s: %s", name, why_not(name, device, dtype))
    shapes = attention_shapes(model, batch_size, width, height)
    cache_file = Path(os.environ.get("SDBATCH_CACHE", Path.home() / ".cache" / "sdbatch")) / "attention-auto.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    per_shape, table = {}, []
    for shape in shapes:
        key = _cache_key(device, dtype, shape)
        if key not in cache:
            cache[key] = {name: time_backend(name, shape, device, dtype) for name in runnable}
        timings = cache[key]
        per_shape[shape[1:]] = min(timings, key=timings.get)
        table.append((shape, timings, per_shape[shape[1:]]))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=1))
    for (b, nq, nkv, h, d), timings, best in table:
        cells = "  ".join(f"{name} {ms:.3f}ms" for name, ms in timings.items())
        log.info("attention=auto  b%d q%d kv%d %dx%d: %s -> %s", b, nq, nkv, h, d, cells, best)
    return Choice(runnable[0], per_shape=per_shape)


def _cache_key(device, dtype, shape) -> str:
    import diffusers
    try:
        import xformers
        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = "none"
    gpu = torch.cuda.get_device_name(device)
    return f"{gpu}|torch {torch.__version__}|xformers {xformers_version}|diffusers {diffusers.__version__}|{dtype}|{shape}"


@torch.no_grad()
def attention_shapes(model, batch_size: int, width: int, height: int) -> list[tuple]:
    """Every distinct (batch, q tokens, kv tokens, heads, head_dim) the UNet and VAE run at this size."""
    shapes = set()

    class Recorder(DispatchProcessor):
        def __init__(self):
            super().__init__(Choice("sdpa"))

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
            kv = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            head_dim = attn.to_q.out_features // attn.heads
            shapes.add((hidden_states.shape[0], tokens, kv, attn.heads, head_dim))
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    recorder = Recorder()
    unet_processors, vae_processors = model.unet.attn_processors, model.vae.attn_processors
    model.unet.set_attn_processor(recorder)
    model.vae.set_attn_processor(recorder)
    from sdbatch.render import dummy_unet_call, dummy_vae_call
    dummy_unet_call(model, 2 * batch_size, width, height)
    dummy_vae_call(model, 1, width, height)
    model.unet.set_attn_processor(unet_processors)
    model.vae.set_attn_processor(vae_processors)
    return sorted(shapes)


def time_backend(name, shape, device, dtype, repeats: int = 10) -> float:
    """Median milliseconds of one attention call at this shape (CUDA events, after a warm-up)."""
    b, nq, nkv, h, d = shape
    q = torch.randn(b, nq, h, d, device=device, dtype=dtype)
    kv = torch.randn(b, nkv, h, d, device=device, dtype=dtype)
    for _ in range(2):
        split_attend(BACKENDS[name], q, kv, kv, None)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        split_attend(BACKENDS[name], q, kv, kv, None)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_flops(shape) -> float:
    b, nq, nkv, h, d = shape
    return 4.0 * b * h * nq * nkv * d

