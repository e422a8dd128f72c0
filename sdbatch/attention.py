"""Attention backends as one diffusers attention processor that dispatches the core softmax(QK^T)V per shape.

Each backend is a function attend(q, k, v) on (batch, tokens, heads, head_dim) tensors. The processor does the
projections once; which backend runs for each attention shape is decided before rendering (`auto` times them).
"""

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sdbatch import SdbatchError, first_line
from sdbatch.models import VAE_CHUNK, dummy_unet_call, dummy_vae_call
from sdbatch.writer import write_atomic

log = logging.getLogger("sdbatch")
TIMINGS_FILE = "attention-timings.json"
MAX_BATCH_HEADS = 65535  # the CUDA kernels fail with "invalid configuration argument" at batch*heads >= 65536


# ---------------------------------------------------------------- backends: (B, N, H, D) in, (B, N, H, D) out
def vanilla(q, k, v, options=None):
    """The materialised softmax(QK^T)V, computed as diffusers' AttnProcessor does (heads folded into the batch)."""
    batch, tokens, heads, dim = q.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * heads, t.shape[1], dim) for t in (q, k, v))
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                           q, k.transpose(-1, -2), beta=0, alpha=dim ** -0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)
    return out.view(batch, heads, tokens, dim).transpose(1, 2)


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
    op = (options or {}).get("op", "auto")
    if op == "flash3" and not torch.compiler.is_compiling():  # a compiled shape was checked when it was chosen
        _check_flash3(q)
    return xformers_attention(q, k, v, op)  # strided views of fused projections too: no copies


XFORMERS_CHECKED = set()  # (op, dtype, device, shapes, strides) that xformers' checks passed: later calls skip them


@torch.library.custom_op("sdbatch::xformers_attention", mutates_args=())
def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> torch.Tensor:
    """xformers' forward as one opaque operator, so torch.compile never traces xformers' Python dispatch (its
    checks, logging and version probes), where one graph break splits the UNet's graph: a break in sdbatch's own
    flash3 check made a compiled SD1.5 step 24% slower on an H100 (notes.md)."""
    import xformers.ops as xops
    if op == "auto":
        return xops.memory_efficient_attention_forward(q, k, v)
    forward = getattr(xops.fmha, op).FwOp  # XFORMERS_OPS name fmha's modules
    inputs = (op, q.dtype, q.device, *(t.shape for t in (q, k, v)), *(t.stride() for t in (q, k, v)))
    if inputs in XFORMERS_CHECKED:  # its checks take more host time than the kernel (scripts/gpu/host_overhead.py)
        return forward.apply(xops.fmha.Inputs(q, k, v), needs_gradient=False)[0].reshape(*q.shape[:-1], v.shape[-1])
    out = xops.memory_efficient_attention_forward(q, k, v, op=forward)
    XFORMERS_CHECKED.add(inputs)
    return out


@xformers_attention.register_fake
def _(q, k, v, op):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


FLASH3_WIDTHS = (64, 96, 128, 192, 256)  # the head widths FlashAttention-3 has kernels for (it pads up to one)


def _check_flash3(q):
    """Raise where the installed FlashAttention-3 build has no kernel for q. Its own checks are no use: on a width,
    dtype or GPU it was built without, the process dies (seen: a segfault at head width 256 on a build up to 192)."""
    widest, left_out = _flash3_build()
    if q.shape[-1] > widest:
        raise ValueError(f"this FlashAttention-3 build has kernels for head widths up to {widest}, not {q.shape[-1]}")
    if q.dtype == torch.float16 and "FLASHATTENTION_DISABLE_FP16" in left_out:
        raise ValueError("this FlashAttention-3 build has no fp16 kernels")
    if "FLASHATTENTION_DISABLE_SM8x" in left_out and torch.cuda.get_device_capability(q.device) < (9, 0):
        raise ValueError("this FlashAttention-3 build has kernels for Hopper GPUs only")


@functools.cache
def _flash3_build() -> tuple[int, frozenset]:
    """The widest head FlashAttention-3 was built for, and the build flags that left kernels out."""
    from flash_attn_config import CONFIG  # written by flash-attention's setup.py beside the package
    left_out = frozenset(flag for flag, disabled in CONFIG["build_flags"].items() if disabled)
    widest = max((w for w in FLASH3_WIDTHS if f"FLASHATTENTION_DISABLE_HDIM{w}" not in left_out), default=0)
    return widest, left_out


XFORMERS_OPS = ("cutlass", "flash", "flash3")  # xformers.ops.fmha modules, each with its forward operator FwOp


def xformers_ops() -> list[str]:
    """The operators `op=auto` times: FlashAttention-3 only where its package is installed (xformers loads it from
    flash-attention's hopper/ build, which scripts/gpu/fa3.sh makes), so its absence is no warning."""
    return [op for op in XFORMERS_OPS if op != "flash3" or importlib.util.find_spec("flash_attn_3")]


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
    """diffusers attention processor: projections as AttnProcessor2_0 (fused when the model fused them), the core
    attention by the variant chosen for its shape."""

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
        query, key, value = project(attn, hidden_states, encoder_hidden_states)
        batch, heads = query.shape[0], attn.heads
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads) for t in (query, key, value))
        name, options = self.choice.variant_for(q.shape, k.shape[1])
        out = split_attend(BACKENDS[name], q, k, v, options).reshape(batch, -1, query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def project(attn: Attention, hidden_states, encoder_hidden_states):
    """Query, key and value; one matmul for self-attention QKV (and cross-attention KV) once fused."""
    if encoder_hidden_states is None:
        if getattr(attn, "to_qkv", None) is not None and attn.fused_projections:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        context = hidden_states
    else:
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        if getattr(attn, "to_kv", None) is not None and attn.fused_projections:
            return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


Variant = tuple  # (backend name, options dict)


class Choice:
    """Which variant (backend + kernel/op) runs for each attention shape (q tokens, kv tokens, heads, head_dim)."""

    def __init__(self, default: Variant, per_shape: dict | None = None):
        self.default, self.per_shape = default, per_shape or {}

    def variant_for(self, q_shape, kv_tokens) -> Variant:
        return self.per_shape.get((q_shape[1], kv_tokens, q_shape[2], q_shape[3]), self.default)

    @property
    def label(self) -> str:
        """The backends that really run, for the ledger's attention_backend column."""
        names = {name for name, _ in self.per_shape.values()} or {self.default[0]}
        return "+".join(sorted(names))

    @property
    def detail(self) -> str:
        if not self.per_shape:
            return describe(self.default)
        return "; ".join(f"q{q} kv{kv} {h}x{d}: {describe(v)}" for (q, kv, h, d), v in sorted(self.per_shape.items()))


def describe(variant: Variant) -> str:
    name, options = variant
    return "/".join([name, *(str(v) for v in options.values())])


def apply(model, choice: Choice) -> None:
    processor = DispatchProcessor(choice)
    model.unet.set_attn_processor(processor)
    model.vae.set_attn_processor(processor)


# ---------------------------------------------------------------- choosing and checking backends
def candidates(name: str, options: dict) -> list[Variant]:
    """The variants a backend setting stands for: an `auto` kernel/op is chosen per shape by timing."""
    if name == "auto":  # vanilla is in: it wins the VAE's single 512-wide head, which no fused kernel supports well
        return candidates("sdpa", {"kernel": "auto"}) + candidates("xformers", {"op": "auto"}) + [("vanilla", {})]
    if name == "sdpa" and options.get("kernel", "auto") == "auto":
        return [("sdpa", {"kernel": "auto"})] + [("sdpa", {"kernel": k}) for k in ("flash", "efficient", "cudnn")]
    if name == "xformers" and options.get("op", "auto") == "auto":
        return [("xformers", {"op": op}) for op in xformers_ops()]
    return [(name, options)]


def choose(cfg, model, device: torch.device, dtype: torch.dtype, batch_size: int, width: int, height: int,
           timings_file: Path | None = None) -> Choice:
    """The attention variant for every shape of this run; a plain-words error when the asked-for backend can't run.

    On a GPU each shape's candidates are timed (or, for a fixed kernel, tried) at the run's real shapes; a shape
    that no candidate of the asked-for backend can run falls back to PyTorch SDPA with a warning.
    timings_file: where the run's workers share their timings (see TimingCache).
    """
    options = {k: v for k, v in cfg.items() if k != "name"}
    if cfg.name != "auto" and cfg.name not in BACKENDS:
        raise SdbatchError(f"Unknown attention backend '{cfg.name}': choose one of auto, {', '.join(BACKENDS)}.")
    variants = candidates(cfg.name, options)
    with asking_for_kernels():
        problems = [why_not(*v, device=device, dtype=dtype) for v in variants]
    runnable = [v for v, problem in zip(variants, problems) if problem is None]
    if cfg.name != "auto" and not runnable:
        raise SdbatchError(problems[0])
    # fused kernels are expected on a GPU in fp16/bf16 only (flash and cuDNN attention have no fp32 kernels)
    level = logging.WARNING if device.type == "cuda" and dtype != torch.float32 else logging.DEBUG
    for variant, problem in zip(variants, problems):
        if problem:
            log.log(level, "attention=%s: leaving out %s: %s", cfg.name, describe(variant), problem)
    if cfg.name == "auto" and not runnable:
        runnable = [("sdpa", {"kernel": "auto"})]
    if device.type != "cuda":
        return Choice(runnable[0])
    with asking_for_kernels():
        return Choice(runnable[0], per_shape_choice(model, runnable, device, dtype, batch_size, width, height,
                                                    cfg.name, timings_file))


@contextlib.contextmanager
def asking_for_kernels():
    """Trying each kernel on purpose: torch's "... kernel not used because ..." warnings say what sdbatch already
    records (a kernel that cannot run a shape is left out), so they stay out of the log. torch raises them from C++,
    so Python files them under the module that called it: this one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"torch\.|{re.escape(__name__)}$")
        warnings.filterwarnings("ignore", message=r".*(kernel not used|was not compiled with).*")
        yield


def per_shape_choice(model, runnable, device, dtype, batch_size, width, height, asked, timings_file) -> dict:
    timed = len(runnable) > 1
    cache = TimingCache(device, dtype, timings_file)
    per_shape = {}
    for shape in attention_shapes(model, batch_size, width, height):
        timings = {describe(v): cache.time(v, shape) if timed else trial(v, shape, device, dtype) for v in runnable}
        best = min(timings, key=timings.get)
        if math.isinf(timings[best]):
            log.warning("attention=%s cannot run shape %s; using sdpa for it", asked, shape)
            per_shape[shape[1:]] = ("sdpa", {"kernel": "auto"})
            continue
        per_shape[shape[1:]] = next(v for v in runnable if describe(v) == best)
        if timed:
            cells = "  ".join(f"{name} {ms:.3f}ms" for name, ms in timings.items())
            log.info("attention b%d q%d kv%d %dx%d: %s -> %s", *shape, cells, best)
    cache.save()
    return per_shape


def why_not(name: str, options: dict | None = None, device=None, dtype=None) -> str | None:
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
        return (f"attention={describe((name, options or {}))} cannot run on {device} ({dtype}): "
                f"{first_line(error).rstrip('.')}. "
                f"Use attention=auto or attention=sdpa.")
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
        found = re.search(r"PyTorch (\S+)", str(cpp._cpp_library_load_exception))
        built_for = f"torch {found.group(1)}" if found else "another torch"
        return (f"attention=xformers cannot run: xformers {xformers.__version__}'s compiled extension was built for "
                f"{built_for}, but this is torch {torch.__version__}, so memory_efficient_attention has no operator. "
                f"Install an xformers built for torch {torch.__version__} (scripts/gpu/setup.sh builds one from "
                f"source), or use attention=sdpa or attention=auto.")
    return None


class TimingCache:
    """Per-shape timings on disk, keyed by GPU, library versions, dtype, shape and variant.

    A run keeps them in the folder its array tasks and reruns share (path), so every worker that starts after the
    first timings are saved, on any machine, reads the same timings and makes the same choice: the same kernels
    (the same pixels, whichever worker renders a row) and the same compiled graph (a compile-cache hit). Timings
    already on disk are never replaced. SDBATCH_CACHE names another folder; with neither, ~/.cache/sdbatch."""

    def __init__(self, device, dtype, path: Path | None = None):
        import diffusers
        try:
            import xformers
            xformers_version = xformers.__version__
        except ImportError:
            xformers_version = "none"
        self.device, self.dtype = device, dtype
        self.prefix = (f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|xformers {xformers_version}|"
                       f"diffusers {diffusers.__version__}|{dtype}")
        folder = os.environ.get("SDBATCH_CACHE")
        self.path = Path(folder) / TIMINGS_FILE if folder else path or Path.home() / ".cache" / "sdbatch" / TIMINGS_FILE
        self.entries = self.on_disk()

    def on_disk(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or a file an older sdbatch left half-written: time again
            return {}

    def time(self, variant: Variant, shape) -> float:
        key = f"{self.prefix}|{shape}|{describe(variant)}"
        if key not in self.entries:
            self.entries[key] = time_variant(variant, shape, self.device, self.dtype)
        return self.entries[key]

    def save(self) -> None:
        """Whole or not at all (workers start together and share the file); what another worker saved meanwhile
        stays."""
        self.entries = {**self.entries, **self.on_disk()}
        write_atomic(self.path, json.dumps(self.entries, indent=1).encode())


@torch.no_grad()
def attention_shapes(model, batch_size: int, width: int, height: int) -> list[tuple]:
    """Every distinct (batch, q tokens, kv tokens, heads, head_dim) the UNet and VAE run at this size."""
    shapes = set()

    class Recorder(DispatchProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
            kv = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            shapes.add((hidden_states.shape[0], tokens, kv, attn.heads, attn.inner_dim // attn.heads))
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    unet_processors, vae_processors = model.unet.attn_processors, model.vae.attn_processors
    recorder = Recorder(Choice(("sdpa", {"kernel": "auto"})))
    model.unet.set_attn_processor(recorder)
    model.vae.set_attn_processor(recorder)
    dummy_unet_call(model, 2 * batch_size, width, height)
    dummy_vae_call(model, min(batch_size, VAE_CHUNK), width, height)
    model.unet.set_attn_processor(unet_processors)
    model.vae.set_attn_processor(vae_processors)
    return sorted(shapes)


def random_qkv(shape, device, dtype):
    """Random q and (shared) k/v at (batch, q tokens, kv tokens, heads, head_dim): never time on zeros."""
    b, nq, nkv, h, d = shape
    return torch.randn(b, nq, h, d, device=device, dtype=dtype), torch.randn(b, nkv, h, d, device=device, dtype=dtype)


def trial(variant: Variant, shape, device, dtype) -> float:
    """0 if the variant runs this shape with finite output, else inf."""
    q, kv = random_qkv(shape, device, dtype)
    try:
        return 0.0 if torch.isfinite(split_attend(BACKENDS[variant[0]], q, kv, kv, variant[1])).all() else math.inf
    except Exception:
        return math.inf


def time_variant(variant: Variant, shape, device, dtype, repeats: int = 10) -> float:
    """Median milliseconds of one attention call at this shape (CUDA events, after a warm-up); inf if it fails."""
    from sdbatch.benchmark import time_cuda_ms
    if math.isinf(trial(variant, shape, device, dtype)):
        return math.inf
    q, kv = random_qkv(shape, device, dtype)
    return time_cuda_ms(lambda: split_attend(BACKENDS[variant[0]], q, kv, kv, variant[1]), warmup=1, repeats=repeats)


def attention_flops(shape) -> float:
    """FLOPs of softmax(QK^T)V at (batch, q tokens, kv tokens, heads, head_dim): two matmuls."""
    b, nq, nkv, h, d = shape
    return 4.0 * b * h * nq * nkv * d
