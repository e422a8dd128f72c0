"""python -m sdbatch prompts=catalog.parquet [key=value ...]"""

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from sdbatch import EXIT_INTERRUPTED, SdbatchError, cli, log_to_stderr, settings


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> None:
    log_to_stderr()
    stop_before_rendering()
    try:
        settings.check(cfg)  # again here: a sweep job on a Slurm node composes its own config
        quiet_libraries()
        from sdbatch.launch import launch  # imported late: torch and diffusers take seconds to import
        code = launch(cfg)
    except SdbatchError as error:
        print(f"sdbatch: error: {error}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def main() -> None:
    cli.start("config", settings.run_problems)  # --help, and every mistake in the command line, before Hydra and torch
    run_job()


def stop_before_rendering() -> None:
    """Until the worker takes over the stop signals, SIGTERM/SIGUSR1 (exit 75) and Ctrl-C (exit 130) mean "nothing
    started yet: rerun to continue"."""
    def interrupted(signum, frame):
        print(f"sdbatch: stopped by {signal.Signals(signum).name} before rendering; rerun to continue",
              file=sys.stderr, flush=True)
        os._exit(130 if signum == signal.SIGINT else EXIT_INTERRUPTED)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, interrupted)


def quiet_libraries() -> None:
    """Keep the libraries' import-time chatter (a CPU-only xformers) out of the user's log; diffusers and
    transformers are quieted by sdbatch.job when it imports them (most runs that end early never do)."""
    logging.getLogger("xformers").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()
