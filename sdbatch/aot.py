"""Ahead-of-time compiled UNet and VAE decoder: torch.export + AOTInductor packages kept in the compile cache.

torch.compile re-traces the UNet in every new process, even when every kernel comes from its cache (16.5 s of an
SD1.5 warm start on an H100). A package is loaded instead, with no tracing: one per module, input signature and
everything else that shapes its graph (weights, their layout and dtypes, the attention choice, library versions,
the GPU). The package holds no copy of the weights: it runs on the module's own tensors.
"""

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("sdbatch")
MODES = {"default": {}, "max-autotune-no-cudagraphs": {"max_autotune": True}, "max-autotune": {"max_autotune": True}}


class Call(torch.nn.Module):
    """The module's method as a module of tensors only (what torch.export takes): the other arguments are fixed."""

    def __init__(self, target: torch.nn.Module, method, spec, constants: dict):
        super().__init__()
        self.target, self.method, self.spec, self.constants = target, method, spec, constants

    def forward(self, *tensors):
        leaves, given = [], iter(tensors)
        for i in range(self.spec.num_leaves):
            leaves.append(self.constants[i] if i in self.constants else next(given))
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return self.method(*args, **kwargs)


class Compiled:
    """Stands in for module.<method> (forward, vae.decode): per input signature, runs the package built for it,
    loaded from the cache folder, or exported and compiled there first (for every later process)."""

    def __init__(self, module: torch.nn.Module, method: str, folder: Path, identity: dict, mode: str):
        self.module, self.folder, self.mode = module, folder, mode
        self.name = identity["module"]
        self.original = getattr(module, method)
        self.identity = {**identity, **environment(), "weights_layout": layout(module)}
        self.runners: dict = {}

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_dict", True):
            raise TypeError(f"the compiled {self.name} is called with return_dict=False only")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        signature = (str(spec), *(signature_of(x) for x in leaves))
        if signature not in self.runners:
            self.runners[signature] = self.runner(spec, leaves, signature)
        return self.runners[signature](*tensors)

    def runner(self, spec, leaves: list, signature):
        key = hashlib.sha256(json.dumps({**self.identity, "inputs": str(signature)}, sort_keys=True).encode())
        path = self.folder / f"{self.name}-{key.hexdigest()[:32]}.pt2"
        fixed = {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
        call = Call(self.module, self.original, spec, fixed)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        shapes = ", ".join("x".join(map(str, t.shape)) or "scalar" for t in tensors)
        if path.exists():
            started = time.perf_counter()
            try:
                package = load(path, call)
                log.info("loaded the compiled %s for %s in %.1fs", self.name, shapes, time.perf_counter() - started)
                return package
            except Exception as error:  # a package another torch wrote, or a damaged file: build it again
                log.warning("the compiled %s in %s could not be loaded (%s); compiling it again", self.name, path,
                            first_line(error))
        log.info("compiling the %s ahead of time for %s (once per shape; later processes load %s)", self.name,
                 shapes, path.name)
        return self.build(path, call, tensors)

    def build(self, path: Path, call: Call, tensors: list):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec")  # torch's own pickling
                program = torch.export.export(call, tuple(tensors), strict=False)
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial),
                    inductor_configs={"aot_inductor.package_constants_in_so": False, **MODES[self.mode]})
            (path.with_suffix(".json")).write_text(json.dumps(self.identity, indent=1, sort_keys=True))
            os.replace(partial, path)  # whole or absent: a worker racing this one loads either package
            return load(path, call)
        except Exception as error:  # torch.export cannot trace every model: torch.compile still can
            partial.unlink(missing_ok=True)
            log.warning("the %s could not be compiled ahead of time (%s); using torch.compile for it, which "
                        "re-traces in every new process", self.name, first_line(error))
            return torch.compile(call, mode=self.mode, dynamic=False)


def load(path: Path, call: Call):
    """The package at path, running on call's own weights (shared, not copied)."""
    package = torch._inductor.aoti_load_package(str(path))
    weights = {**dict(call.named_parameters()), **dict(call.named_buffers())}
    package.load_constants({name: weights[name] for name in package.get_constant_fqns()}, check_full_update=True,
                           user_managed=True)
    return package


def compile_model(model, folder: Path, identity: dict, mode: str) -> None:
    """Replace the UNet's forward and the VAE's decode by packages from folder (built there when missing)."""
    model.unet.forward = Compiled(model.unet, "forward", folder, {**identity, "module": "unet"}, mode)
    model.vae.decode = Compiled(model.vae, "decode", folder, {**identity, "module": "vae-decoder"}, mode)


def signature_of(leaf) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"{leaf.dtype} {tuple(leaf.shape)} {leaf.stride()} {leaf.device.type}"
    return repr(leaf)


def layout(module: torch.nn.Module) -> str:
    """A digest of every weight's name, shape, dtype and strides, and the module classes (fused projections, fp8
    linears, channels-last all change it)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name} {signature_of(tensor)}\n".encode())
    for name, sub in module.named_modules():
        digest.update(f"{name} {type(sub).__qualname__}\n".encode())
    return digest.hexdigest()


def environment() -> dict:
    """What else the generated code depends on: the libraries, sdbatch's own code (its attention processor and fp8
    linears are traced into the graph) and the GPU."""
    import diffusers
    source = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "sdbatch_source": source.hexdigest(),
            "gpu": gpu, "cuda": torch.version.cuda}


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
