"""``plw-data``: the data stage's console script (``plw-data build ...`` / ``plw-data stats ...``).

Same as ``python -m pipeline.data.build <overrides>`` and ``python -m pipeline.data.stats <overrides>``.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from pipeline.data.build import main as build_main
from pipeline.data.stats import main as stats_main

USAGE = """usage: plw-data {build,stats} [hydra overrides]
  plw-data build dataset=shared_alpaca_gpt4_short        build (or reuse) one processed dataset
  plw-data stats stats_datasets=[alpaca_data,dolly]      Table 1 statistics (CSV + Markdown)"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "stats"):
        print(USAGE, file=sys.stderr)
        return 2
    return (build_main if argv[0] == "build" else stats_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
