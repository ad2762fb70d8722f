"""Running on a Ray cluster: roles placed by their configured resources over a local multi-node
cluster, and the cluster/ manifests checked against what the recipes ask for.

The multi-node run happens in a subprocess (this file run as a script): `ray.cluster_utils.Cluster`
connects its own driver, which must not replace the test session's Ray instance (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
# Each node of the local cluster offers one role's custom resource, as a cluster/ node group does.
# (The head is the sandbox node: one raylet fewer to start on a 2-core machine.)
NODE_RESOURCES = {"sandbox": {"sandbox": 1}, "generator": {"generator": 2}, "learner": {"learner": 2}}
OVERRIDES = ["task.name=arith,terminal", "rollout.group_size=4", "rollout.resources.generator=1",
             "learner.num_workers=2", "learner.resources.learner=1", "sandbox.node_resource=sandbox",
             "trainer.groups_per_step=4", "trainer.total_steps=3", "task.eval_size=4",
             "replay.filter_zero_variance=false", "run.progress=false"]


# -- (a) a local multi-node cluster ----------------------------------------------------------------
def node_of(actor) -> str:
    import ray
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def run_on_local_cluster(out_path: str, run_dir: str) -> None:
    """Subprocess: three nodes (the first is the head), each offering one role's custom resource;
    spawn the GRPO roles there, train a few steps on arithmetic and terminal tasks (the terminal
    ones graded in the sandbox node's pool); write what ran where to `out_path`."""
    sys.path.insert(0, str(ROOT))
    import ray
    from ray.cluster_utils import Cluster
    from tqdm import tqdm

    from rayrl.config import GRPOConfig, load
    from rayrl.metrics import MetricsLogger
    from rayrl.models import resolve_model_path
    from rayrl.pipeline import Trainer, spawn
    from tests.ray_head import free_port

    # Free ports for the dashboard agents, which would all bind 52365 (the test session's Ray holds it).
    start = time.monotonic()
    cluster = Cluster()
    nodes = {role: cluster.add_node(num_cpus=2, resources=resources, include_dashboard=False,
                                    dashboard_agent_listen_port=free_port()).node_id
             for role, resources in NODE_RESOURCES.items()}
    print(f"{time.monotonic() - start:.0f} s: {len(nodes)} nodes up", flush=True)
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = load(GRPOConfig, str(ROOT / "recipes" / "grpo.yaml"), [*OVERRIDES, f"run.dir={run_dir}"])
    model_path = resolve_model_path(cfg.model)
    roles = spawn(cfg, model_path)
    try:
        trainer = Trainer(cfg, roles, model_path)
        print(f"{time.monotonic() - start:.0f} s: roles up", flush=True)
        with tqdm(disable=True) as progress:
            history = trainer.train_rl(MetricsLogger(run_dir, export_to_ray=False), progress)
        print(f"{time.monotonic() - start:.0f} s: trained", flush=True)
        placed = {"generators": [node_of(g) for g in roles.generators],
                  "learners": [node_of(w) for w in roles.learner.workers],
                  "pools": [node_of(p) for p in roles.sandboxes.pools],
                  "pool_leases": sum(ray.get(p.stats.remote())["leases"] for p in roles.sandboxes.pools),
                  "generator_versions": ray.get([g.version.remote() for g in roles.generators])}
    finally:
        roles.shutdown()
        ray.shutdown()
        cluster.shutdown()
    print(f"{time.monotonic() - start:.0f} s: cluster down", flush=True)
    with open(out_path, "w") as f:
        json.dump({"nodes": nodes, **placed, "history": history}, f)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_roles_are_placed_on_the_nodes_that_offer_their_resources(tmp_path):
    from tests.ray_head import ray_env
    out = tmp_path / "placement.json"
    with ray_env() as env:
        done = subprocess.run([sys.executable, __file__, str(out), str(tmp_path / "run")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads(out.read_text())
    nodes = result["nodes"]
    assert len(set(nodes.values())) == 3
    assert set(result["generators"]) == {nodes["generator"]}
    assert set(result["learners"]) == {nodes["learner"]} and len(result["learners"]) == 2
    assert set(result["pools"]) == {nodes["sandbox"]}
    assert min(result["generator_versions"]) >= 1   # the learner's weights crossed to the generator node
    history = result["history"]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["samples"] > 0 and h["learner/loss_tokens"] > 0 for h in history)
    # the terminal tasks were graded in sandboxes leased from the sandbox node's pool
    assert any("domain/terminal/reward" in h for h in history)
    assert result["pool_leases"] > 0


def test_a_role_no_node_can_hold_is_an_error_naming_its_keys(ray_session, monkeypatch):
    from rayrl.config import ConfigError, GRPOConfig, load
    from rayrl.pipeline import check_resources
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load(GRPOConfig, str(ROOT / "recipes" / "grpo.yaml"), ["rollout.resources.generator=1",
                                                                   "learner.num_gpus=1"])
    with pytest.raises(ConfigError) as err:   # a recipe prints it as one line, status 2
        check_resources(cfg)
    assert "generator 1 per actor (rollout.num_cpus/num_gpus/resources)" in str(err.value)
    assert "GPU 1 per actor (learner.num_cpus/num_gpus/resources)" in str(err.value)
    check_resources(load(GRPOConfig, str(ROOT / "recipes" / "grpo.yaml"), []))   # the defaults fit one machine
    # Each role fits a node, but not all of them at once: the learner's placement group would wait forever.
    crowded = load(GRPOConfig, str(ROOT / "recipes" / "grpo.yaml"), ["rollout.num_generators=4", "rollout.num_cpus=2"])
    with pytest.raises(ConfigError, match=r"CPU \d+ for all the roles at once, of 8 in all"):
        check_resources(crowded)
    # Experts trained at once each hold their roles: the defaults fit one machine once, not eight times.
    with pytest.raises(ConfigError, match=r"CPU \d+ for all the roles of 8 runs \(unify.parallel_experts=8\) at once"):
        check_resources(load(GRPOConfig, str(ROOT / "recipes" / "grpo.yaml"), []), 8, "unify.parallel_experts")


@pytest.mark.parametrize("arg, named", [
    ("rollout.resources.GPU=1", "rollout.resources.GPU: GPU is not a custom resource"),
    ("learner.resources.learner=0", "learner.resources.learner=0.0 must be > 0"),
    ("distill.teacher_gpus=-1", "distill.teacher_gpus=-1.0 must be >= 0.0"),
    ("learner.placement=scatter", "learner.placement='scatter' is not one of pack, spread"),
    ("sandbox.node_resource=CPU", "sandbox.node_resource='CPU'"),
    ("unify.parallel_experts=0", "unify.parallel_experts=0 must be >= 1"),
])
def test_bad_placement_settings_fail_naming_the_key(arg, named):
    from rayrl.config import ConfigError, UnifyConfig, load
    with pytest.raises(ConfigError, match=re.escape(named)):
        load(UnifyConfig, None, [arg])


# -- (b) the cluster/ manifests ---------------------------------------------------------------------
def custom_resources(ray_start_params: dict) -> dict[str, float]:
    """KubeRay's rayStartParams.resources: a JSON object inside a quoted string."""
    raw = ray_start_params.get("resources")
    return json.loads(raw.strip().strip('"').replace('\\"', '"')) if raw else {}


def kuberay_nodes() -> dict[str, list[dict]]:
    """{group: [the Ray resources of each of its nodes at `replicas`]} of cluster/kuberay/raycluster.yaml."""
    docs = list(yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()))
    spec = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    groups = {"head": (spec["headGroupSpec"], 1)}
    groups.update({g["groupName"]: (g, g["replicas"]) for g in spec["workerGroupSpecs"]})
    out = {}
    for name, (group, replicas) in groups.items():
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = {"CPU": float(params.get("num-cpus", limits["cpu"])),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))), **custom_resources(params)}
        out[name] = [dict(node) for _ in range(replicas)]
    return out


def launcher_nodes() -> dict[str, list[dict]]:
    """{node type: [the Ray resources of each node at min_workers]} of cluster/ray-cluster.yaml."""
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    return {name: [{"GPU": 0.0, **{k: float(v) for k, v in t["resources"].items()}}
                   for _ in range(1 if name == config["head_node_type"] else t["min_workers"])]
            for name, t in config["available_node_types"].items()}


def ray_jobs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text())["spec"] for p in sorted(KUBERAY.glob("rayjob-*.yaml"))}


def recipe_config(entrypoint: str):
    """The config the entry point's recipe would run with, loaded by the recipe's own main()
    (its YAML files and the entry point's overrides, validated), stopped before anything starts."""
    words = shlex.split(entrypoint)
    assert words[0] == "python" and words[1].startswith("recipes/"), entrypoint
    script = ROOT / words[1]
    assert script.is_file(), f"{words[1]} is not a recipe"
    spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = []

    class Loaded(Exception):
        pass

    def capture(*args):
        loaded.append(real_load(*args))
        raise Loaded

    real_load, module.load_recipe = module.load_recipe, capture
    with pytest.raises(Loaded):
        module.main(words[2:])
    return loaded[0]


def place(nodes: dict[str, list[dict]], cfg) -> list[str]:
    """First fit of every actor of every role (largest first) onto the nodes; what did not fit."""
    from rayrl.config import role_demands
    free = [dict(n) for group in nodes.values() for n in group]
    actors = sorted(((keys, need) for keys, count, need in role_demands(cfg) for _ in range(count)),
                    key=lambda a: (-a[1].get("GPU", 0), -a[1].get("CPU", 0)))
    unplaced = []
    for keys, need in actors:
        node = next((n for n in free if all(n.get(r, 0) >= v for r, v in need.items())), None)
        if node is None:
            unplaced.append(f"{keys}: {need}")
            continue
        for r, v in need.items():
            node[r] -= v
    return unplaced


def test_cluster_manifests_fit_the_jobs_they_run():
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())))   # Ray's schema
    clusters = {"kuberay": kuberay_nodes(), "ray up": launcher_nodes()}
    for name, nodes in clusters.items():
        assert nodes["head"][0]["CPU"] == 0 and nodes["head"][0]["GPU"] == 0, f"{name}: the head runs no role"
    jobs = ray_jobs()
    assert {shlex.split(j["entrypoint"])[1] for j in jobs.values()} >= {"recipes/unify_distill.py", "recipes/grpo.py"}
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    asked: set[str] = set()
    for job_name, job in jobs.items():
        assert job["clusterSelector"]["ray.io/cluster"] == "rayrl", job_name
        job_env = yaml.safe_load(job["runtimeEnvYAML"])
        assert job_env["env_vars"] == runtime_env["env_vars"] and job_env["excludes"] == runtime_env["excludes"]
        assert job_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
        cfg = recipe_config(job["entrypoint"])
        # run directories and the model cache on the volume every node mounts
        assert cfg.run.dir.startswith("/mnt/rayrl/") and cfg.model.cache_dir.startswith("/mnt/rayrl/"), job_name
        for name, nodes in clusters.items():
            assert place(nodes, cfg) == [], f"{job_name} does not fit the {name} cluster"
            if cfg.sandbox.node_resource:
                assert any(n.get(cfg.sandbox.node_resource) for g in nodes.values() for n in g), (job_name, name)
        from rayrl.config import role_demands
        asked |= {r for _, _, need in role_demands(cfg) for r in need} | {cfg.sandbox.node_resource}
    for name, nodes in clusters.items():   # every node group is there for a role some job places on it
        offered = {r for group in nodes.values() for n in group for r in n if r not in ("CPU", "GPU")}
        assert offered == {"generator", "learner", "sandbox"} and offered <= asked, (name, offered, asked)


def test_a_job_that_asks_more_than_the_cluster_has_does_not_fit():
    cfg = recipe_config(ray_jobs()["rayjob-grpo.yaml"]["entrypoint"] + " rollout.num_generators=64")
    assert place(kuberay_nodes(), cfg)
    cfg = recipe_config(ray_jobs()["rayjob-grpo.yaml"]["entrypoint"] + " learner.resources.trainer=1")
    assert any("learner" in u for u in place(kuberay_nodes(), cfg))


if __name__ == "__main__":
    run_on_local_cluster(sys.argv[1], sys.argv[2])
