"""python -m sdbatch prompts=catalog.parquet [key=value ...]"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from sdbatch import SdbatchError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sdbatch %(levelname)s %(message)s", stream=sys.stderr)
    quiet_libraries()
    from sdbatch.launch import launch  # imported late: torch and diffusers take seconds to import
    try:
        code = launch(cfg)
    except SdbatchError as error:
        print(f"sdbatch: error: {error}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def quiet_libraries() -> None:
    """Keep the libraries' import-time chatter (a CPU-only xformers, dtype notes) out of the user's log."""
    logging.getLogger("xformers").setLevel(logging.ERROR)
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
