"""profile_attention.py, printing each Inductor graph's layout-optimisation decision (channels-last convolutions)
and the node and convolution counts its cut is made on:

    python scripts/gpu/layout_probe.py --model sdxl --size 1024 --latents 16 --contiguous --fp8 --setups sdpa

Since sdbatch forces the decision for the UNet (models.channels_last_convolutions), it prints True for it; the
measurement in docs/benchmarks/notes.md ran before that, with TORCHINDUCTOR_FORCE_LAYOUT_OPT=1 for the forced row."""
import runpy
import sys

import torch
from torch._inductor.graph import GraphLowering

original = GraphLowering.decide_layout_opt


def logged(gm, *, is_inference):
    decision = original(gm, is_inference=is_inference)
    nodes = len(gm.graph.nodes)
    convs = sum(n.target is torch.ops.aten.convolution.default for n in gm.graph.nodes)
    print(f"LAYOUT_OPT {decision}: {nodes} nodes, {convs} convolutions (skipped at >= {300 * convs})", flush=True)
    return decision


GraphLowering.decide_layout_opt = staticmethod(logged)
sys.argv = ["scripts/gpu/profile_attention.py", *sys.argv[1:]]
runpy.run_path("scripts/gpu/profile_attention.py", run_name="__main__")
