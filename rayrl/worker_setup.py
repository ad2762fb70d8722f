"""Setup of every Ray worker process of a rayrl job (Ray's `worker_process_setup_hook`, installed by
`pipeline.init_ray`): it keeps third-party chatter out of the job's logs, where it outnumbered the
run's own lines three to one. Stdlib only: it runs in every worker before any actor code."""

from __future__ import annotations

import logging
import os
import warnings


def setup_worker() -> None:
    # transformers draws a progress bar for every weight load and save, in every actor.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # DeepSpeed warns, in every process that imports it on a CPU node, that it picked the CPU.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    # DeepSpeed's ZeRO calls a torch collective that torch deprecates, once per learner start.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
