import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def ray_session():
    """One local Ray instance shared by the tests that need it (starting one costs seconds).

    Function-scoped so that a test which needs a Ray cluster of its own (multi-node) can shut
    this one down; the next test that asks for it starts it again.
    """
    import ray
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    return ray
