"""Exact resume: a run stopped after step k continues from its checkpoint (`run.resume`) and ends
step k + 1 with bit-for-bit the parameters of the run that was never stopped (CPU, same seed,
run.deterministic with replay.max_staleness=0, 2 DeepSpeed ZeRO-2 learner workers over gloo);
and what makes that hold, piece by piece, without Ray: the buffer's tickets and seeded rollouts."""

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import msgpack
import pytest

from rayrl.config import ConfigError, GRPOConfig, SRPOConfig, load, load_recipe, to_dict
from rayrl.replay.buffer import ReplayBuffer
from tests.test_config import RECIPE_YAML, ROOT

K = 2   # the run stops after step K
SETTINGS = ["task.max_operand=9", "task.eval_size=16", "trainer.eval.initial=false", "trainer.eval.every=0",
            "trainer.sft.steps=30", "trainer.sft.batch_size=32", "trainer.groups_per_step=4", "rollout.group_size=4",
            "replay.max_staleness=0", "rollout.num_generators=1", "run.deterministic=true",
            "learner.num_workers=2", "learner.zero_stage=2", "run.progress=false",
            "rollout.mismatch_check_tokens=100000",   # the weight-sync check's window spans the stop
            f"trainer.total_steps={K + 1}", f"trainer.ckpt_every={K}"]


def weights(checkpoint):
    from safetensors.torch import load_file
    return load_file(str(checkpoint / "model.safetensors"))


def rl_records(run_dir):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["step"] > 0]


@pytest.mark.slow
def test_a_resumed_run_ends_the_next_step_with_exactly_the_parameters_of_an_unstopped_run(ray_session, tmp_path):
    import torch

    from rayrl.pipeline import run
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run(load(GRPOConfig, str(RECIPE_YAML), SETTINGS + [f"run.dir={whole}"]))

    # The stopped run: its directory as a stop just after step K + 1 was logged leaves it, before
    # any later checkpoint: the config, the metrics so far and checkpoint step_K, which was taken
    # while the generators were already rolling out step K + 1's groups.
    checkpoint = whole / "checkpoints" / f"step_{K}"
    shutil.copytree(checkpoint, stopped / "checkpoints" / f"step_{K}")
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(whole / name, stopped / name)
    replay = json.load(open(checkpoint / "replay_state.json"))
    held = msgpack.unpackb(open(checkpoint / "replay_held.msgpack", "rb").read())
    assert len(replay["in_flight"]) + len(held) > 0, "the checkpoint caught none of the next step's groups"

    summary = run(load(GRPOConfig, str(RECIPE_YAML), SETTINGS + [f"run.resume={stopped}"]))

    expected, resumed = weights(whole / "checkpoints" / "final"), weights(stopped / "checkpoints" / "final")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected), \
        [k for k in expected if not torch.equal(expected[k], resumed[k])]
    before = weights(checkpoint)
    assert any(not torch.equal(before[k], expected[k]) for k in before), "step K + 1 changed nothing"

    # The same groups were trained on, and the metrics read as one run: steps 1 .. K + 1 once each.
    logged = rl_records(stopped)
    assert [r["step"] for r in logged] == list(range(1, K + 2))
    for key in ("reward_mean", "samples", "learner/loss", "learner/grad_norm", "buffer/received",
                "learner/mismatch_window_tokens"):   # the window resumed with steps 1 .. K's tokens
        assert logged[K][key] == rl_records(whole)[K][key], key
    assert len(open(stopped / "metrics.lost.jsonl").readlines()) == 1   # step K + 1 as first logged
    assert summary["steps"] == K + 1 and summary["reward_first"] == logged[0]["reward_mean"]
    assert logged[K]["learner/mismatch_window_tokens"] > logged[K]["learner/onpolicy_tokens"] > 0


def steps_logged(run_dir) -> list[int]:
    """The steps of a running run's metrics.jsonl (SFT updates are -S+1 .. 0, RL steps 1 ..),
    counting only lines written whole."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]


def stop_when(proc, run_dir, log, enough) -> str:
    """SIGTERM the recipe once `enough(steps logged)`; returns its output once it has ended."""
    try:
        deadline = time.monotonic() + 300
        while not enough(steps_logged(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out[-3000:]
    return out


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_saves_its_last_whole_step_and_resumes_from_it(tmp_path):
    """`ray job stop` sends the driver SIGTERM (Ctrl-C sends SIGINT; the same path). The run saves
    the last update it finished, logged and whole, in SFT or in RL, and `run.resume` continues
    from there."""
    from tests.ray_head import ray_env
    run_dir, sft_steps = tmp_path / "run", 60
    settings = [*(s for s in SETTINGS if not s.startswith(("trainer.total_steps", "trainer.ckpt_every",
                                                           "trainer.sft.steps"))),
                f"run.dir={run_dir}", "trainer.ckpt_every=0", f"trainer.sft.steps={sft_steps}"]
    recipe = [sys.executable, str(ROOT / "recipes" / "grpo.py")]
    log = tmp_path / "stopped.log"   # a file, not a pipe: a full pipe would block the run

    def start(*args):
        with open(log, "w") as sink:
            return subprocess.Popen([*recipe, *args], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)

    with ray_env() as env:
        # Stopped in SFT: checkpoint sft_<k> of the last SFT update logged.
        out = stop_when(start(*settings, "trainer.total_steps=200"), run_dir, log, lambda steps: len(steps) >= 3)
        saved = os.listdir(run_dir / "checkpoints")
        assert len(saved) == 1 and saved[0].startswith("sft_"), (saved, out[-3000:])
        state = json.load(open(run_dir / "checkpoints" / saved[0] / "trainer_state.json"))
        sft_done = state["sft_step"]
        assert (state["step"], saved[0]) == (0, f"sft_{sft_done}") and 3 <= sft_done < sft_steps, out[-3000:]
        assert f"stopped after SFT step {sft_done} (KeyboardInterrupt: SIGTERM): saving" in out, out[-3000:]
        assert steps_logged(run_dir) == list(range(-sft_steps + 1, -sft_steps + sft_done + 1))

        # Resumed, it finishes SFT with the updates it had not made, then is stopped in RL.
        out = stop_when(start(f"run.resume={run_dir}", "trainer.total_steps=200", "run.progress=false"),
                        run_dir, log, lambda steps: sum(s > 0 for s in steps) >= 2)
        saved = sorted(os.listdir(run_dir / "checkpoints"))
        assert len(saved) == 2 and saved[1].startswith("step_"), (saved, out[-3000:])
        state = json.load(open(run_dir / "checkpoints" / saved[1] / "trainer_state.json"))
        stopped_at = state["step"]
        assert f"stopped after step {stopped_at} (KeyboardInterrupt: SIGTERM): saving" in out, out[-3000:]
        # The checkpoint is of the last logged step: nothing trained after it, nothing missing before it.
        assert stopped_at >= 2 and steps_logged(run_dir) == list(range(-sft_steps + 1, stopped_at + 1))
        assert state["metrics_lines"] == len(open(run_dir / "metrics.jsonl").readlines())
        assert state["sft_step"] == sft_steps and state["evals"]["eval_before"] is not None

        resumed = subprocess.run([*recipe, f"run.resume={run_dir}", f"trainer.total_steps={stopped_at + 1}",
                                  "run.progress=false"], cwd=ROOT, env=env, text=True, capture_output=True,
                                 timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert steps_logged(run_dir) == list(range(-sft_steps + 1, stopped_at + 2))
    assert not (run_dir / "metrics.lost.jsonl").exists()
    assert (run_dir / "checkpoints" / "final" / "trainer_state.json").exists()


def test_a_signal_in_a_guarded_step_waits_for_its_end_and_a_second_one_does_not():
    from rayrl.pipeline import StepGuard
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StepGuard() as guard:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with guard.step():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True        # the step goes on to its end
        assert finished
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):   # between steps: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        guard.pending = None
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            with guard.step():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)   # the second stops the step
                time.sleep(5)
                pytest.fail("the second signal did not stop the step")
    assert {s: signal.getsignal(s) for s in before} == before   # the handlers it replaced are back


def test_a_bad_resume_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match="run.resume=.*no such directory"):
        load(GRPOConfig, str(RECIPE_YAML), [f"run.resume={tmp_path / 'missing'}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="run.resume=.*no checkpoint to resume from"):
        load(GRPOConfig, str(RECIPE_YAML), [f"run.resume={tmp_path / 'empty'}"])

    # A run with a setting off the YAML's, checkpointed at step 3.
    run_dir = tmp_path / "run"
    original = load(GRPOConfig, str(RECIPE_YAML), [f"run.dir={run_dir}", "trainer.lr=1e-5"])
    (run_dir / "checkpoints" / "step_3").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_3" / "trainer_state.json").write_text(
        json.dumps({"step": 3, "config": to_dict(original)}))
    (run_dir / "config.json").write_text(json.dumps(to_dict(original)))
    with pytest.raises(ConfigError, match=r"trainer.lr: saved 1e-05, this run 0.0005"):
        load(GRPOConfig, str(RECIPE_YAML), [f"run.resume={run_dir}"])
    with pytest.raises(ConfigError, match="learner.num_workers: saved 2, this run 1"):
        load(GRPOConfig, str(RECIPE_YAML), [f"run.resume={run_dir}", "trainer.lr=1e-5", "learner.num_workers=1"])
    # The recipes continue the run as it was configured (its config.json), with allowed changes.
    resumed = load_recipe(GRPOConfig, str(RECIPE_YAML), [f"run.resume={run_dir}", "trainer.total_steps=99"])
    assert resumed.trainer.lr == 1e-5 and resumed.trainer.total_steps == 99
    with pytest.raises(ConfigError, match="srpo starts over"):
        load(SRPOConfig, str(ROOT / "recipes" / "srpo.yaml"), [f"run.resume={run_dir}"])
    with pytest.raises(ConfigError, match="run.deterministic=true needs replay.max_staleness=0"):
        load(GRPOConfig, str(RECIPE_YAML), ["run.deterministic=true", "replay.max_staleness=1"])


def meta(rewards=(0.0, 1.0)):
    return {"id": "g", "task_id": None, "domain": "arith", "min_version": 0, "rewards": list(rewards),
            "infra_failures": 0, "num_paths": len(rewards), "num_tokens": 10, "loss_tokens": 4}


async def test_a_restored_buffer_reissues_the_tickets_in_flight_and_keeps_the_held_groups():
    first = ReplayBuffer(groups_per_step=3, max_staleness=0, filter_zero_variance=True, seed=5)
    tickets = [await first.acquire_ticket(timeout=0.1) for _ in range(3)]
    assert [t["index"] for t in tickets] == [0, 1, 2] and len({t["seed"] for t in tickets}) == 3
    await first.put(meta((1.0, 1.0)), ["solved"], 0)    # dropped (no GRPO signal), so ticket 3 is admitted
    await first.put(meta(), ["tree 2"], 2)              # held: finished before ticket 1
    tickets.append(await first.acquire_ticket(timeout=0.1))
    snapshot = first.snapshot()

    second = ReplayBuffer(groups_per_step=3, max_staleness=0, filter_zero_variance=True, seed=5)
    second.load_state_dict(json.loads(json.dumps(snapshot["state"])))   # saved as JSON
    second.restore_held(snapshot["held"])
    again = [await second.acquire_ticket(timeout=0.1) for _ in range(2)]
    assert again == [tickets[1], tickets[3]]                 # same numbers, seeds and tasks, in order
    assert await second.acquire_ticket(timeout=0.05) is None   # the step's groups are all out
    await second.put(meta(), ["tree 3"], 3)
    await second.put(meta(), ["tree 1"], 1)
    batch = await second.get(3, 0, timeout=0.1)
    assert [ref for _, ref in batch] == ["tree 1", "tree 2", "tree 3"]   # in ticket order
    assert second.dropped == first.dropped and second.received == first.received + 2
    await second.set_version(1)                            # the step's weights are out: next step
    fresh = await second.acquire_ticket(timeout=0.1)
    assert fresh["index"] == 4 and fresh["seed"] == random.Random("5:4").getrandbits(63)


async def test_a_batch_given_back_leaves_the_buffer_as_if_it_was_never_handed_out():
    buffer = ReplayBuffer(groups_per_step=2, max_staleness=1, filter_zero_variance=False, seed=3)
    for _ in range(3):
        ticket = await buffer.acquire_ticket(timeout=0.1)
        await buffer.put(meta(), [f"tree {ticket['index']}"], ticket["index"])
    before = json.dumps(buffer.snapshot(), sort_keys=True)
    batch = await buffer.get(2, 0, timeout=0.1)
    assert [ref for _, ref in batch] == ["tree 0", "tree 1"]
    assert buffer.stats()["consumed"] == 2
    await buffer.give_back(batch, 0)
    assert json.dumps(buffer.snapshot(), sort_keys=True) == before
    assert [ref for _, ref in await buffer.get(2, 0, timeout=0.1)] == ["tree 0", "tree 1"]


async def test_a_seeded_group_samples_the_same_whatever_shares_the_engine():
    from rayrl.models import resolve_model_path
    from rayrl.rollout.generator import RolloutGenerator
    cfg = GRPOConfig()
    cfg.rollout.group_size = 4
    gen = RolloutGenerator(resolve_model_path(cfg.model), cfg.rollout, cfg.task)
    task, others = gen.env.sample(random.Random(1)), [gen.env.sample(random.Random(i)) for i in (2, 3)]
    alone = await gen.rollout_group(task, "g", seed=11)
    alongside = await asyncio.gather(gen.rollout_group(others[0], "a"), gen.rollout_group(task, "g", seed=11),
                                     gen.rollout_group(others[1], "b", seed=12))
    assert alongside[1] == alone
    samples = [tuple(p.tokens) for p in alone.paths()]
    assert len(set(samples)) > 1, "every sample of the group drew the same tokens"
    gen._serve_task.cancel()
