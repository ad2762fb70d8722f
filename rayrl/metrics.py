"""Run metrics: metrics.jsonl (one object per step), summary.json, and Ray dashboard gauges."""

from __future__ import annotations

import json
import math
import os
import re
import time


class MetricsLogger:
    def __init__(self, run_dir: str, export_to_ray: bool = True):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._start = time.time()
        self._gauges: dict = {}
        self._export = export_to_ray

    def _gauge(self, name: str):
        from ray.util.metrics import Gauge
        if name not in self._gauges:
            # Prometheus names allow [A-Za-z0-9_:] only ("learner/loss" -> "rayrl_learner_loss").
            metric = "rayrl_" + re.sub(r"[^A-Za-z0-9_:]", "_", name)
            # Tagged with the run directory: the runs (jobs) on one cluster chart apart.
            self._gauges[name] = Gauge(metric, description=f"rayrl {name} (last step)", tag_keys=("run",))
        return self._gauges[name]

    def log(self, step: int, values: dict) -> dict:
        record = {"step": step, "time_s": round(time.time() - self._start, 3)}
        record.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        if self._export:
            for k, v in record.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._gauge(k).set(v, tags={"run": self.run_dir})
        return record

    def summary(self, values: dict) -> str:
        path = os.path.join(self.run_dir, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
