"""GRPO on the toy arithmetic task: SFT warm start, then asynchronous GRPO, evaluated before and after.

    python recipes/grpo.py trainer.total_steps=20 trainer.lr=1e-5 run.dir=/tmp/x
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import GRPOConfig, load_recipe  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = load_recipe(GRPOConfig, os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo.yaml"), argv)
    from rayrl.pipeline import print_summary, run
    print_summary(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
