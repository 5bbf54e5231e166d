"""Print the composed, validated config: ``python -m pipeline.show_config model=llama2_7b plw=0.1``."""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config


def main(argv=None) -> int:
    try:
        cfg = load_config(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
