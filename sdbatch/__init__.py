"""sdbatch: batch offline Stable Diffusion rendering from a Parquet manifest."""

__version__ = "0.1.0"


class SdbatchError(Exception):
    """A problem with the user's input or setup, explained in one paragraph and shown without a traceback."""
