"""Reproduces the AOTInductor load segfault of the GPU machine's torch (2.11.0+cu130): compile, load and run one
case per process, `python scripts/gpu/aot_debug.py CASE`, CASE one of lin-package, lin-so, unet-package, unet-so
(a one-layer model or sdbatch's tiny UNet; a .pt2 package or the older .so route). For the native stack, preload
scripts/gpu/segv_backtrace.c: `gcc -shared -fPIC -o /tmp/segv.so scripts/gpu/segv_backtrace.c` and run with
LD_PRELOAD=/tmp/segv.so (docs/benchmarks/logs/aot-h100-segfault.log is its output there). With CXX set to a script
that runs g++ with -Wl,-Bsymbolic added to each link (-shared), the lin and unet packages load there
(docs/benchmarks/notes.md, "AOTInductor's load segfault, a second look")."""
import os
import sys
import time

import torch

case = sys.argv[1]
folder = "/tmp/aot-debug"
os.makedirs(folder, exist_ok=True)


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return (self.lin(x).relu(),)


def unet():
    from sdbatch.models import tiny_model, random_unet_inputs
    from sdbatch import attention
    m = tiny_model("sd").to(torch.device("cuda"), torch.float16)
    attention.apply(m, attention.Choice(("sdpa", {"kernel": "auto"})))
    x, embeds, _ = random_unet_inputs(m, 4, 64, 64)

    class Call(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, e):
            return self.unet(x, t, encoder_hidden_states=e, return_dict=False)
    return Call(m.unet), (x, torch.tensor(999, device="cuda"), embeds)


with torch.no_grad():
    if case.startswith("lin"):
        mod, args = Lin().cuda(), (torch.randn(8, 64, device="cuda"),)
    else:
        mod, args = unet()
    ref = mod(*args)[0]
    ep = torch.export.export(mod, args, strict=False)
    t0 = time.time()
    if case.endswith("package"):
        path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{folder}/{case}.pt2")
        print(case, "compiled", time.time() - t0, flush=True)
        runner = torch._inductor.aoti_load_package(path)
    else:  # the .so route: torch._inductor.aot_compile + torch._export.aot_load
        so = torch._inductor.aot_compile(ep.module(), args, options={"aot_inductor.output_path": f"{folder}/{case}.so"})
        print(case, "compiled", time.time() - t0, so, flush=True)
        runner = torch._export.aot_load(so, "cuda")
    print(case, "loaded", flush=True)
    out = runner(*args)
    out = out[0] if isinstance(out, (list, tuple)) else out
    torch.cuda.synchronize()
    print(case, "ran, max diff", (out.float() - ref.float()).abs().max().item(), flush=True)
