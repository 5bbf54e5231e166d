"""Print the composed, validated config: ``python -m pipeline.show_config model=llama2_7b plw=0.1``."""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from pipeline import cli


def main(argv=None) -> int:
    _, overrides = cli.parse(cli.parser("python -m pipeline.show_config", __doc__), argv)
    try:
        cfg, _ = cli.compose(overrides)
    except cli.CONFIG_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
