"""Host time per attention call, layer by layer, on a shape too small for the GPU to be the bottleneck: what a UNet
step pays on the CPU per attention call in eager mode (SDXL makes 140 of them per step).

    source scripts/gpu/setup.sh && python scripts/gpu/host_overhead.py
"""

import time

import torch
import torch.nn.functional as F

from sdbatch import attention

CALLS = 500


def host_us(fn) -> float:
    """Microseconds of host time per call, the GPU kept behind: calls are queued back to back, synced at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / CALLS * 1e6


def main():
    import xformers.ops as xops
    from xformers.ops import fmha

    q = torch.randn(2, 64, 10, 64, device="cuda", dtype=torch.float16)
    layers = {
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(*[q.transpose(1, 2)] * 3),
        "sdbatch sdpa backend": lambda: attention.sdpa(q, q, q, {"kernel": "auto"}),
    }
    for op in attention.xformers_ops():
        fw = getattr(fmha, op).FwOp
        layers[f"xformers {op}: FwOp.apply(Inputs)"] = lambda fw=fw: fw.apply(fmha.Inputs(q, q, q), False)
        layers[f"xformers {op}: memory_efficient_attention_forward"] = (
            lambda fw=fw: xops.memory_efficient_attention_forward(q, q, q, op=fw))
        layers[f"xformers {op}: sdbatch custom op"] = lambda op=op: attention.xformers_attention(q, q, q, op)
        layers[f"xformers {op}: sdbatch backend"] = lambda op=op: attention.xformers(q, q, q, {"op": op})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: host µs per call at {tuple(q.shape)}",
          flush=True)
    with torch.no_grad():
        for name, fn in layers.items():
            print(f"  {name:55s} {host_us(fn):7.1f} µs", flush=True)


if __name__ == "__main__":
    main()
