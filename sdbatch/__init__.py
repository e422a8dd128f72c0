"""sdbatch: batch offline Stable Diffusion rendering from a Parquet manifest."""

import logging
import sys

__version__ = "0.1.0"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1; rerun the same command to continue


class SdbatchError(Exception):
    """A problem with the user's input or setup, explained in one paragraph and shown without a traceback."""


def first_line(error: Exception) -> str:
    """An exception's message in one line for an error or warning of ours (its type where it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].strip()


def log_to_stderr() -> None:
    """sdbatch's progress log (INFO and up, timestamped) on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sdbatch %(levelname)s %(message)s", stream=sys.stderr)
