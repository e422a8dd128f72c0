"""One worker process per visible GPU (or `processes=N`), each a worker in the global plan."""

import glob
import os
import signal
import subprocess
import sys

from sdbatch import SdbatchError


def launch(cfg) -> int:
    """Run this machine's workers: in this process when there is one, else as child processes."""
    count = process_count(cfg)
    if count == 1 or "SDBATCH_LOCAL_RANK" in os.environ:
        from sdbatch.run import run
        return run(cfg)
    return run_children(count)


def process_count(cfg) -> int:
    if str(cfg.processes) != "auto":
        if int(cfg.processes) < 1:
            raise SdbatchError(f"processes must be auto or at least 1, not {cfg.processes}.")
        return int(cfg.processes)
    if cfg.device == "cpu":
        return 1
    return max(1, len(visible_gpus()))


def run_children(count: int) -> int:
    """Start `count` copies of this command, one per GPU; forward stop signals; the worst exit code wins.

    The children get a process group of their own, so a Ctrl-C in the terminal reaches them once, through us."""
    gpus = visible_gpus()
    children = []
    for rank in range(count):
        env = {**os.environ, "SDBATCH_LOCAL_RANK": str(rank), "SDBATCH_LOCAL_COUNT": str(count)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[rank % len(gpus)]
        children.append(subprocess.Popen([sys.executable, "-m", "sdbatch", *sys.argv[1:]], env=env,
                                         process_group=0))

    def forward(signum, frame):
        for child in children:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return worst(codes)


def worst(codes: list[int]) -> int:
    """0 only if every child succeeded; a setup error (2) outranks an interruption (75, 130); a child killed by a
    signal (negative code) counts as interrupted by it (128 + signal)."""
    codes = [128 - code if code < 0 else code for code in codes]
    return max(codes, key=lambda code: (code != 0, code == 2, code))


def visible_gpus() -> list[str]:
    """The GPUs this machine gives us, as CUDA_VISIBLE_DEVICES entries; found without importing torch (seconds that
    every child would otherwise wait for), from CUDA_VISIBLE_DEVICES or nvidia-smi, and torch only without either."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        found = None
    if found is not None and found.returncode == 0:
        return [line.strip() for line in found.stdout.splitlines() if line.strip()]
    if found is not None or not glob.glob("/dev/nvidia[0-9]*"):
        return []  # nvidia-smi finds no GPU, or there is neither nvidia-smi nor an NVIDIA device: no GPU here
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
