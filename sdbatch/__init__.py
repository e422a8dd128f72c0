"""sdbatch: batch offline Stable Diffusion rendering from a Parquet manifest."""

__version__ = "0.1.0"
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1; rerun the same command to continue


class SdbatchError(Exception):
    """A problem with the user's input or setup, explained in one paragraph and shown without a traceback."""
