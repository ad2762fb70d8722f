"""MCLA on a tiny MoE: variance of the log importance weights between engine and learner.

A tiny Qwen3-MoE (8 experts, top 2, built locally) whose router logits get Gaussian noise at every
forward pass, the numerical noise that flips near-tied experts at scale, is warm-started briefly
on arithmetic so that its outputs are peaked. The engine samples once; then for K = 1, 2, 4, 8 the
engine's behaviour log-probs and the learner's old log-probs are each the mean over K forward
passes (MCLA, K = 1 being the sampling pass itself) and the variance of log(pi_old / pi_b) over the
sampled tokens is measured, with and without routing replay, together with the share of tokens
IcePop (rho outside [0.5, 2]) masks. The same weights on both sides: every bit of mismatch is
routing noise. K = 1 is the baseline, measured on the same samples; a dense model of the same
size is the reference without routing.

    python benchmarks/mcla.py [noise=1.0] [sft_steps=300] [samples=256]

Last line: one JSON object with var_k1 ... var_k8 (MCLA alone), var_k1_replay ... (with routing
replay), masked_k1 ... and the target check var_k8 <= var_k1 / 4.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._args import parse  # noqa: E402
from rayrl.cli import exit_status  # noqa: E402

KS = (1, 2, 4, 8)
DEFAULTS = {"noise": 1.0, "sft_steps": 300, "samples": 256}


def main(argv: list[str]) -> None:
    args = parse(argv, __doc__, DEFAULTS)
    noise, sft_steps, n = args["noise"], args["sft_steps"], args["samples"]
    import torch

    from rayrl.config import TinyModelConfig
    from rayrl.mcla import measure, warm_start
    from rayrl.models import build_tiny_model
    torch.set_num_threads(1)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        moe = build_tiny_model(os.path.join(tmp, "moe"), TinyModelConfig(family="qwen3_moe", router_noise=noise))
        moe = warm_start(moe, os.path.join(tmp, "moe_sft"), sft_steps)
        dense = build_tiny_model(os.path.join(tmp, "dense"), TinyModelConfig(family="llama"))
        dense = warm_start(dense, os.path.join(tmp, "dense_sft"), sft_steps)
        results = measure(moe, KS, n)
        reference = measure(dense, (1,), n)[(1, False)]

    print(f"\ntiny Qwen3-MoE (8 experts, top 2), router noise {noise}, {sft_steps} warm-start steps, "
          f"{n} sampled answers; log w = log pi_old (learner) - log pi_b (engine)")
    print(f"{'K':>3}{'var log w':>12}{'IcePop masked':>15}{'max w':>9}  |{'var log w':>12}{'IcePop masked':>15}"
          f"{'max w':>9}")
    print(f"{'':>3}{'MCLA':>36}  |{'MCLA + routing replay':>36}")
    for k in KS:
        a, b = results[(k, False)], results[(k, True)]
        print(f"{k:>3}{a['var']:>12.5f}{a['masked_frac']:>15.4f}{a['max_weight']:>9.2f}  |"
              f"{b['var']:>12.5f}{b['masked_frac']:>15.4f}{b['max_weight']:>9.2f}")
    print(f"dense reference (same size, no routing): var log w {reference['var']:.2e}, "
          f"masked {reference['masked_frac']:.4f}")
    var1, var8 = results[(1, False)]["var"], results[(8, False)]["var"]
    print(f"var_k8 / var_k1 = {var8 / var1:.3f} (target <= 0.25); wall {time.time() - start:.0f} s")
    out = {f"var_k{k}": round(results[(k, False)]["var"], 6) for k in KS}
    out.update({f"var_k{k}_replay": round(results[(k, True)]["var"], 6) for k in KS})
    out.update({f"masked_k{k}": round(results[(k, False)]["masked_frac"], 5) for k in KS})
    out.update({f"masked_k{k}_replay": round(results[(k, True)]["masked_frac"], 5) for k in KS})
    out.update({"var_ratio_k8_k1": round(var8 / var1, 4), "target_met": var8 <= var1 / 4,
                "var_dense": reference["var"], "router_noise": noise, "samples": n, "sft_steps": sft_steps})
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
