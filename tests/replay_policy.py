from rayrl.rollout.replay import ReplayPolicy  # noqa: F401  (tests import it from here)
