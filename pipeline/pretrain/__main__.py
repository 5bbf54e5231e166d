"""``python -m pipeline.pretrain``: see :mod:`pipeline.pretrain.cli`."""

import sys

from pipeline.pretrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
