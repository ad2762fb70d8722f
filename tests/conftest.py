import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def local_ray():
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture
def ray_session():
    """One local Ray instance shared by the tests that need it (starting one costs seconds).

    Function-scoped so that a test which needs a Ray cluster of its own (multi-node) can shut
    this one down; the next test that asks for it starts it again.
    """
    return local_ray()


@pytest.fixture(scope="session")
def arith_warm_start(tmp_path_factory) -> str:
    """recipes/grpo.yaml's SFT warm start, 400 updates (a minute on 2 cores), trained once for the
    tests that run RL from it: the checkpoint's path."""
    from rayrl.config import GRPOConfig, load
    from rayrl.pipeline import run
    from tests.test_config import RECIPE_YAML
    local_ray()
    cfg = load(GRPOConfig, str(RECIPE_YAML), [
        "trainer.sft.steps=400", "trainer.total_steps=0", "trainer.eval.initial=false", "task.eval_size=16",
        f"run.dir={tmp_path_factory.mktemp('arith_warm_start')}", "run.progress=false"])
    return run(cfg)["checkpoint"]
