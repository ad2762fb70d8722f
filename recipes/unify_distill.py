"""Specialize-then-Unify (KAT-Coder-V2): train five domain experts, distill them into one student.

    python recipes/unify_distill.py                                   # the whole thing, tiny models, CPU
    python recipes/unify_distill.py unify.reuse=runs/unify            # reuse the experts of an earlier run
    python recipes/unify_distill.py unify.experts.swe=/ckpt/swe ...   # or given expert checkpoints
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python recipes/unify_distill.py

Expert training is configured by train_expert.yaml, the student by unify_distill.yaml (layered on
top); `key=value` arguments override both. Prints the per-domain table, writes summary.json and
unify.png in run.dir.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rayrl.cli import exit_status  # noqa: E402
from rayrl.config import UnifyConfig, load_recipe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]) -> int:
    cfg = load_recipe(UnifyConfig, [os.path.join(HERE, "train_expert.yaml"), os.path.join(HERE, "unify_distill.yaml")],
                      argv)
    from rayrl.unify import print_table, unify
    print_table(unify(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
