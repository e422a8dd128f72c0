"""Where a warm start's seconds go: imports, building the model, and the compiled UNet's first call in a new process
that finds the compile cache a first process filled; with torch.compile (`compile`, sdbatch's compile_engine=jit),
with the saved ahead-of-time compile sdbatch loads instead (`aot`, compile_engine=aot), and with Dynamo's caching
precompile (`precompile`: torch 2.11, experimental; its warm load failed there).

    python scripts/bench_startup.py --arch sd15 --size 512 --batch 32 --out docs/benchmarks/startup-h100.json
    python scripts/bench_startup.py --arch tiny-sd --size 64 --batch 2 --device cpu --out /tmp/startup.json   # smoke

Every measurement is a fresh process (imports included) on a fresh cache folder for its cold run, then the same
folder for its warm one.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    """One process: import, build, compile the UNet, call it twice; seconds of each part."""
    started = time.perf_counter()
    import torch
    sys.path.insert(0, str(REPO))
    from sdbatch import attention, log_to_stderr
    log_to_stderr()  # sdbatch.aot's "compiling" / "loaded" lines
    from sdbatch.models import fuse_projections, random_model, random_unet_inputs
    imported = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = random_model(args.arch).to(device, dtype)
    attention.apply(model, attention.Choice(("sdpa", {"kernel": "auto"})))
    fuse_projections(model)
    inputs = random_unet_inputs(model, 2 * args.batch, args.size, args.size)
    built = time.perf_counter()
    if args.mode == "precompile":
        torch._dynamo.config.caching_precompile = True
    if args.mode == "aot":
        from sdbatch import aot
        aot.compile_model(model, Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent / "aot", {"attention": "sdpa"},
                          unet_options={}, vae_options={})
    unet = model.unet if args.mode == "aot" else torch.compile(model.unet, dynamic=False)

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            unet(inputs[0], torch.tensor(500, device=device), encoder_hidden_states=inputs[1],
                 added_cond_kwargs=inputs[2], return_dict=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first, second = call(), call()
    if args.mode == "precompile":
        torch.compiler.save_cache_artifacts()  # writes the traced frames to the Dynamo cache folder
    print(torch._dynamo.utils.compile_times(repr="str"), file=sys.stderr)
    return {"imports_s": imported - started, "model_s": built - imported, "first_call_s": first,
            "steady_call_s": second}


def measure(args, mode: str, cache: Path, run: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", "--mode", mode, "--arch", args.arch, "--size",
                           str(args.size), "--batch", str(args.batch), "--device", args.device],
                          env=env, capture_output=True, text=True)
    lines = done.stderr.splitlines()
    own = [line for line in lines if " sdbatch " in line]  # what aot loaded or compiled, then Dynamo's timings
    print(*own, "\n".join(line for line in lines if line not in own)[-3000:], sep="\n", file=sys.stderr, flush=True)
    if done.returncode:
        return {"mode": mode, "run": run, "error": done.stderr.strip().splitlines()[-1]}
    row = {"mode": mode, "run": run, "process_s": time.perf_counter() - start,
           **json.loads(done.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="images per batch (the UNet sees twice as many)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="compile,aot", help="compile, aot, precompile")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    import torch
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "command": "python " + " ".join(sys.argv), "versions": {"torch": torch.__version__},
              "arch": args.arch, "size": args.size, "unet_batch": 2 * args.batch, "rows": []}
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"startup-{mode}-") as folder:
            for run in ("cold", "warm"):
                report["rows"].append(measure(args, mode, Path(folder), run))
                Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
