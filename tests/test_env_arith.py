"""The arith toy task: held-out split, the imperfect teacher, and the share of easy (one-digit) tasks."""

import random

import pytest

from envs.arith import EASY_MAX, ArithEnv
from rayrl.config import TaskConfig


def operands(task) -> tuple[int, int]:
    a, b = task.id.split("+")
    return int(a), int(b)


def test_easy_share_draws_one_digit_tasks_that_the_teacher_gets_right():
    env = ArithEnv(TaskConfig(easy_share=0.5, demo_error=0.6))
    rng = random.Random(0)
    tasks = [env.sample(rng) for _ in range(2000)]
    easy = [t for t in tasks if max(operands(t)) <= EASY_MAX]
    # Half the draws are easy, and a two-digit draw has one-digit operands 1% of the time.
    assert 0.45 < len(easy) / len(tasks) < 0.56
    assert all(env.demonstration(t) == t.answer for t in easy)
    hard = [t for t in tasks if max(operands(t)) > EASY_MAX]
    wrong = sum(env.demonstration(t) != t.answer for t in hard) / len(hard)
    assert 0.5 < wrong < 0.7   # task.demo_error of the two-digit tasks
    held_out = env.eval_tasks(200)
    assert len({t.id for t in held_out}) == 200
    assert {t.id for t in held_out}.isdisjoint(t.id for t in tasks)
    # Each held-out task once: the one-digit ones are the 20% of the 100 that the split holds out.
    assert 10 <= sum(max(operands(t)) <= EASY_MAX for t in held_out) <= 30


def test_without_easy_tasks_a_seed_draws_what_it_always_drew():
    env, rng, expected = ArithEnv(TaskConfig()), random.Random(3), []
    while len(expected) < 20:   # the draws before easy tasks existed: a, b, then the operator
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rng.choice("+")
        if not env._held_out(a, "+", b):
            expected.append(f"{a}+{b}")
    rng = random.Random(3)
    assert [env.sample(rng).id for _ in range(20)] == expected
    # and the teacher errs on one-digit tasks as on any other
    wrong = ArithEnv(TaskConfig(demo_error=0.6))
    one_digit = [wrong._task(a, "+", b) for a in range(10) for b in range(10)]
    assert 40 < sum(wrong.demonstration(t) != t.answer for t in one_digit) < 80


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_an_easy_share_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="task.easy_share"):
        ArithEnv(TaskConfig(easy_share=share))
