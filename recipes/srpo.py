"""SRPO on math and code: a warm start, then stage 1 (math) and stage 2 (math plus code) of GRPO
with History Resampling; held-out math and code accuracy after every stage.

    python recipes/srpo.py
    python recipes/srpo.py replay.resampling=none srpo.stages.0.steps=30 run.dir=/tmp/srpo

Writes metrics.jsonl, summary.json (`stages`: held-out accuracy per domain after each stage) and
the checkpoint (with the History Resampling record, replay_state.json) under run.dir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import SRPOConfig, load_recipe  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = load_recipe(SRPOConfig, os.path.join(os.path.dirname(os.path.abspath(__file__)), "srpo.yaml"), argv)
    from rayrl.srpo import print_table, srpo
    print_table(srpo(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
