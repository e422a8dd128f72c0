"""compile_engine=aot: the UNet and VAE decoder compiled once, saved in the compile cache, and loaded by every later
process without tracing; a damaged file is compiled again, and a model that cannot compile as one graph falls back
to torch.compile. On the CPU, with the tiny SDXL architecture (its UNet takes the added-conditioning dict too)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One process: the tiny model with weights from `seed` (a new process has other weights than the one that compiled:
# the saved compile must run on the module's own), its UNet at two timesteps and its decoder, compiled through
# sdbatch.aot and eagerly; prints the largest difference between them.
PROCESS = """
import json, sys, torch
from pathlib import Path
from sdbatch import aot, log_to_stderr
from sdbatch.models import random_model, random_unet_inputs
from sdbatch import attention
log_to_stderr()
torch._dynamo.config.enable_aot_compile = False  # the default of torch 2.11, the GPU fleet's: sdbatch turns it on
folder, seed, graph_break = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "break"
model = random_model("tiny-sdxl")
attention.apply(model, attention.Choice(("sdpa", {"kernel": "auto"})))
torch.manual_seed(seed)
for p in [*model.unet.parameters(), *model.vae.parameters()]:
    p.data.normal_(0, 0.05)
if graph_break:
    block = model.unet.conv_in.forward
    model.unet.conv_in.forward = lambda x: (torch._dynamo.graph_break(), block(x))[1]
x, embeds, added = random_unet_inputs(model, 2, 64, 64)
z = torch.randn(2, 4, 8, 8)
def run():
    out = [model.unet(x, torch.tensor(t), encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
           for t in (999, 1)]
    return [*out, model.vae.decode(z, return_dict=False)[0]]
with torch.no_grad():
    eager = run()
    aot.compile_model(model, folder, {"attention": "test"}, unet_options={}, vae_options={})
    compiled = run()
print(json.dumps([(a - b).abs().max().item() / b.abs().max().item() for a, b in zip(compiled, eager)]))
"""


def process(folder: Path, seed: int, graph_break: bool = False) -> tuple[list, str]:
    done = subprocess.run([sys.executable, "-c", PROCESS, str(folder), str(seed), "break" if graph_break else "whole"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_new_process_loads_the_saved_compile_and_computes_what_the_model_does(tmp_path):
    folder = tmp_path / "aot"
    cold, log = process(folder, seed=1)
    assert max(cold) < 1e-4, cold
    assert log.count("ahead of time for") == 2, log  # the UNet and the decoder, one signature each
    saved = sorted(folder.glob("*.dynamo"))
    assert [p.name.split("-")[0] for p in saved] == ["unet", "vae"], saved
    assert not list(folder.glob(".tmp-*")), list(folder.iterdir())

    warm, log = process(folder, seed=2)  # other weights: the file holds none of its own
    assert max(warm) < 1e-4, warm
    assert "ahead of time" not in log and log.count("loaded the compiled") == 2, log

    saved[1].write_bytes(saved[1].read_bytes()[:1000])  # a file torn by a full disk, say
    again, log = process(folder, seed=3)
    assert max(again) < 1e-4, again
    assert "could not be loaded" in log and log.count("ahead of time for") == 1, log
    assert len(list(folder.glob("*.dynamo"))) == 2


def test_a_model_with_a_graph_break_falls_back_to_torch_compile_and_later_processes_do_not_try_again(tmp_path):
    folder = tmp_path / "aot"
    results, log = process(folder, seed=1, graph_break=True)
    assert max(results) < 1e-4, results
    assert "the unet: it could not be compiled ahead of time" in log and "torch.compile" in log, log
    assert sorted(p.name.split("-")[0] + p.suffix for p in folder.iterdir()) == ["unet.jit", "vae.dynamo"]

    again, log = process(folder, seed=2, graph_break=True)  # no second trace in vain: straight to torch.compile
    assert max(again) < 1e-4, again
    assert "using torch.compile for the unet: it could not be compiled ahead of time" in log, log
    assert "compiling the" not in log and log.count("loaded the compiled") == 1, log


# One of several processes sharing a cache folder: each round it loads the saved compile of a Linear, and every
# other round (at random) first compiles and saves it again, replacing the file the others are loading.
RACER = """
import random, sys, torch
from pathlib import Path
from sdbatch import aot, log_to_stderr
log_to_stderr()
folder, rounds = Path(sys.argv[1]), int(sys.argv[2])
random.seed(sys.argv[3])
torch.manual_seed(0)
linear, x = torch.nn.Linear(16, 16), torch.randn(4, 16)
with torch.no_grad():
    expected = linear(x)
    for _ in range(rounds):
        compiled = aot.Compiled(linear, "forward", folder, {"module": "linear"}, {})
        if random.random() < 0.5:
            compiled.build(compiled.path(aot.call_signature((x,), {})), (x,), {})
        assert torch.allclose(compiled(x), expected, atol=1e-5)
"""


def test_processes_replacing_and_loading_one_saved_compile_never_read_a_torn_file(tmp_path):
    """Array tasks that start together compile the same shapes into one cache folder, some while others load."""
    folder = tmp_path / "aot"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    first = subprocess.run([sys.executable, "-c", RACER, str(folder), "1", "0"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), "20", str(seed)], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True) for seed in range(1, 5)]
    logs = [racer.communicate(timeout=600)[1] for racer in racers]
    for racer, log in zip(racers, logs):
        assert racer.returncode == 0, log[-3000:]
        assert log.count("loaded the compiled linear") == 20 and "could not be loaded" not in log, log[-3000:]
    assert [p.name.split("-")[0] for p in folder.iterdir()] == ["linear"]  # no temporary file left
