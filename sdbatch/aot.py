"""The UNet and the VAE decoder compiled once and loaded by every later process: Dynamo's ahead-of-time compile
(`torch.compile(..., fullgraph=True).aot_compile`), saved in the compile cache.

torch.compile traces the model again in every new process, even when every kernel comes from its cache (9-12 s of
an SD1.5 warm start on an H100). A saved compile is loaded instead: one file per module, input signature and
everything else that shapes its graph (the weights' layout and dtypes, the attention choice, the compile options,
the libraries, sdbatch's own code, the GPU). It holds no weights: it runs on the module's own tensors, read at each
call, so LoRAs fused or copied into them need no new compile. Dynamo cannot save every guard, so none is kept: the
file's key stands in for them, and a call with another signature gets a file of its own. A module that does not
compile as one graph runs under torch.compile, and a `.jit` file under the same key tells later processes so.
"""

import functools
import hashlib
import inspect
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from sdbatch import first_line
from sdbatch.writer import write_atomic

log = logging.getLogger("sdbatch")


class Compiled:
    """Stands in for module.<method> (the UNet's forward, the VAE's decode): per input signature, a compiled
    function loaded from the cache folder, or compiled and saved there first (for every later process)."""

    def __init__(self, module: torch.nn.Module, method: str, folder: Path, identity: dict, options: dict):
        self.module, self.folder, self.options = module, folder, options
        self.name = identity["module"]
        self.method = getattr(module, method)  # bound, before this object replaces it
        self.unbound = getattr(type(module), method)  # compiled with the module as an input: called the same way
        self.function = inspect.unwrap(self.unbound)  # the code Dynamo traces, under any decorators
        self.identity = {**identity, **environment(), "options": repr(sorted(options.items())),
                         "weights_layout": layout(module)}
        self.runners: dict = {}

    def __call__(self, *args, **kwargs):
        signature = call_signature(args, kwargs)
        if signature not in self.runners:
            self.runners[signature] = self.runner(signature, args, kwargs)
        return self.runners[signature](*args, **kwargs)

    def path(self, signature: str) -> Path:
        key = hashlib.sha256(json.dumps({**self.identity, "inputs": signature}, sort_keys=True).encode())
        return self.folder / f"{self.name}-{key.hexdigest()[:32]}.dynamo"

    def runner(self, signature: str, args: tuple, kwargs: dict):
        path = self.path(signature)
        refused = path.with_suffix(".jit")
        try:
            reason = refused.read_text().strip()
        except FileNotFoundError:
            pass
        else:  # an earlier process traced it in vain: tracing twice per process cost 11 s (SD1.5)
            log.info("using torch.compile for the %s: %s (delete %s to try again)", self.name, reason, refused)
            return self.jit()
        shapes = ", ".join("x".join(map(str, t.shape)) or "scalar" for t in pytree.tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor))
        if path.exists():
            started = time.perf_counter()
            try:
                with path.open("rb") as file, aot_compile_enabled():
                    compiled = torch.compiler.load_compiled_function(file, f_globals=self.globals(),
                                                                     external_data=self.external_data())
                log.info("loaded the compiled %s for %s in %.1fs", self.name, shapes, time.perf_counter() - started)
                return functools.partial(compiled, self.module)
            except Exception as error:  # another torch's file, or a damaged one: compile it again
                log.warning("the compiled %s in %s could not be loaded (%s); compiling it again", self.name, path,
                            first_line(error))
        log.info("compiling the %s ahead of time for %s (once per shape; later processes load %s)", self.name,
                 shapes, path.name)
        return self.build(path, args, kwargs)

    def build(self, path: Path, args: tuple, kwargs: dict):
        try:
            with aot_compile_enabled():
                compiled = torch.compile(self.unbound, fullgraph=True, dynamic=False,
                                         options={**self.options, "guard_filter_fn": no_guards})
                compiled = compiled.aot_compile(((self.module, *args), kwargs))
        except Exception as error:  # a graph break, say: torch.compile still runs it, re-tracing in each process
            reason = f"it could not be compiled ahead of time ({first_line(error)})"
            log.warning("the %s: %s; using torch.compile for it, which traces it again in every new process",
                        self.name, reason)
            self.save(path.with_suffix(".jit"), reason.encode())  # later processes go straight to torch.compile
            return self.jit()
        with tempfile.TemporaryDirectory() as folder:  # torch writes a path; the cache takes it whole or not at all
            try:
                compiled.save_compiled_function(f"{folder}/compiled", external_data=self.external_data())
                data = Path(folder, "compiled").read_bytes()
            except Exception as error:
                log.warning("the compiled %s could not be saved (%s); later processes compile it again", self.name,
                            first_line(error))
            else:
                self.save(path, data)
        return functools.partial(compiled, self.module)

    def save(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as error:
            log.warning("could not write %s (%s); later processes compile the %s again", path, error, self.name)

    def jit(self):
        return torch.compile(self.method, dynamic=False, options=self.options)

    def globals(self) -> dict:
        """The names the compiled code may look up: those of the traced function's module (the decorator's, then the
        decorated function's), and modules Dynamo's code refers to by name (`collections` for an OrderedDict)."""
        modules = {name: module for name, module in sys.modules.items() if "." not in name}
        return {**modules, **self.function.__globals__, **self.unbound.__globals__}

    def external_data(self) -> dict:
        """What the file refers to instead of holding: the module (its weights) and the traced code."""
        return {"module": self.module, "function": self.function}


def compile_model(model, folder: Path, identity: dict, unet_options: dict, vae_options: dict) -> None:
    """Replace the UNet's forward and the VAE's decode by compiled functions from folder (saved there when missing)."""
    model.unet.forward = Compiled(model.unet, "forward", folder, {**identity, "module": "unet"}, unet_options)
    model.vae.decode = Compiled(model.vae, "decode", folder, {**identity, "module": "vae-decoder"}, vae_options)


def aot_compile_enabled():
    """torch.compile gives its function `aot_compile` only under this flag: off by default before torch 2.13."""
    return torch._dynamo.config.patch(enable_aot_compile=True)


def no_guards(entries) -> list[bool]:
    return [False] * len(entries)


def call_signature(args: tuple, kwargs: dict) -> str:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return json.dumps([str(spec), torch.is_grad_enabled(), *map(leaf_signature, leaves)])


def leaf_signature(leaf) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"{leaf.dtype} {tuple(leaf.shape)} {leaf.stride()} {leaf.device}"  # cuda:1: its code names its device
    return repr(leaf)


def layout(module: torch.nn.Module) -> str:
    """A digest of every weight's name, shape, dtype and strides, and the module classes (fused projections, fp8
    linears and channels-last memory all change it)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name} {leaf_signature(tensor)}\n".encode())
    for name, sub in module.named_modules():
        digest.update(f"{name} {type(sub).__qualname__}\n".encode())
    return digest.hexdigest()


@functools.cache  # once per process: the UNet and the decoder share it
def environment() -> dict:
    """What else the compiled code depends on: the libraries, sdbatch's own code (its attention processors and fp8
    linears are traced into the graph) and the GPU."""
    import diffusers
    source = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py"))))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "sdbatch_source": source.hexdigest(),
            "gpu": gpu, "cuda": torch.version.cuda}
