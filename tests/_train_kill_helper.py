"""Subprocess for tests/test_train.py (not a test): train a run and SIGKILL this process at the end of
step K (after its metrics line is written), the way a node failure or ``scancel --signal=KILL`` would.

Usage: python tests/_train_kill_helper.py '<JSON list of hydra overrides>' K
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from pipeline.config import load_config
    from pipeline.train import TrainerCallback, run

    overrides, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])

    class Kill(TrainerCallback):
        def on_step_end(self, trainer, step, row):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    run(load_config(overrides), callbacks=[Kill()])


if __name__ == "__main__":
    main()
