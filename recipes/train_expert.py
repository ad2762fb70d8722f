"""Train one domain expert: SFT on oracle demonstrations, then GRPO in the domain's environment.

    python recipes/train_expert.py domain=terminal
    python recipes/train_expert.py domain=swe trainer.total_steps=20 run.dir=/tmp/swe-expert

Writes the HF checkpoint (run.dir/checkpoints/final) and summary.json with the held-out score
after SFT (eval_before) and after GRPO (eval_after).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import ConfigError, GRPOConfig, load_recipe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def expert_args(argv: list[str]) -> list[str]:
    """`domain=X` is short for `task.name=X` with run.dir runs/expert_X (unless given)."""
    out, domain = [], None
    for arg in argv:
        if arg.startswith("domain="):
            domain = arg.split("=", 1)[1]
            out.append(f"task.name={domain}")
        else:
            out.append(arg)
    named = [a.split("=", 1)[1] for a in argv if a.startswith("task.name=")]
    if domain and named and named[-1] != domain:
        raise ConfigError(f"domain={domain} and task.name={named[-1]} name different domains: give one")
    if domain and not any(a.startswith("run.dir=") for a in argv):
        out.append(f"run.dir=runs/expert_{domain}")
    return out


def main(argv: list[str]) -> int:
    cfg = load_recipe(GRPOConfig, os.path.join(HERE, "train_expert.yaml"), expert_args(argv))
    from rayrl.pipeline import print_summary, run
    print_summary(run(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
