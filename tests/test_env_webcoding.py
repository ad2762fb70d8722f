"""WebCoding tasks graded in headless Chromium: every oracle page scores 1.0 (directly and as the
answer turn of a full episode under both scaffolds); wrong pages score 0 for the right reason."""

import os
import random

import pytest

from envs.webcoding import (SAMPLES, TaskFormatError, WebCodingEnv, extract_html, generate, load_tasks,
                            parse_row)

needs_chromium = pytest.mark.skipif(not WebCodingEnv.available(),
                                    reason="Chromium is not installed (Debian packages chromium, chromium-driver)")


@pytest.fixture
async def env(tmp_path):
    e = WebCodingEnv(screenshot_dir=tmp_path / "shots", timeout_s=15.0)
    yield e
    await e.aclose()


def _task(env, task_id):
    return env.to_task(next(r for r in load_tasks(SAMPLES) if r["task_id"] == task_id))


@needs_chromium
async def test_oracles_score_one_with_a_png_screenshot(env):
    rows = load_tasks(SAMPLES) + [generate(random.Random(s), difficulty=3) for s in range(3)]
    for row in rows:
        task = env.to_task(row)
        reward, info = await env.verify(task, env.demonstration(task))
        assert reward == 1.0, (row["task_id"], info)
        assert info["console_errors"] == [] and all(c["ok"] for c in info["checks"])
        with open(info["screenshot"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 0.0 <= info["layout_score"] <= 1.0


@needs_chromium
@pytest.mark.parametrize("scaffold_name", ["xml", "json"])
async def test_oracles_replayed_as_the_answer_turn(env, scaffold_name):
    from rayrl.config import GRPOConfig
    from rayrl.models import load_tokenizer, resolve_model_path
    from rayrl.rollout.agent import EpisodeLimits, play_task
    from rayrl.rollout.engine import SamplingParams
    from rayrl.rollout.replay import ReplayPolicy
    from rayrl.rollout.scaffolds import get_scaffold

    tokenizer = load_tokenizer(resolve_model_path(GRPOConfig().model))
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scaffold = get_scaffold(scaffold_name, env.tools)      # no tools: the one turn is the answer
    for row in load_tasks(SAMPLES):
        task = env.to_task(row)
        turns = [scaffold.render(a) for a in env.oracle_actions(task)]
        episode, reward, info = await play_task(env, task, ReplayPolicy(tokenizer, turns, stop), tokenizer,
                                                scaffold_name, SamplingParams(stop_token_ids=(stop,)),
                                                EpisodeLimits(max_tokens=4096, max_new_tokens=2048))
        assert episode.end_reason == "answer" and episode.turns == 1, episode.end_reason
        assert reward == 1.0, (row["task_id"], info)


COUNTER_BASE = """<!doctype html><html><body><button id="increment">+</button> <span id="count">0</span>
<script>let c = 0; document.getElementById('increment').onclick = () => {
  document.getElementById('count').textContent = BODY; };</script></body></html>"""


@needs_chromium
async def test_wrong_pages_score_zero(env):
    counter, heading, toggle = _task(env, "web-counter"), _task(env, "web-heading"), _task(env, "web-toggle")

    async def score(task, html, reason=None):
        reward, info = await env.verify(task, f"Here you go:\n```html\n{html}\n```")
        if reason is not None:
            assert info["reason"] == reason, info
        return reward, info

    assert (await score(counter, COUNTER_BASE.replace("BODY", "++c"), "ok"))[0] == 1.0
    # the click does nothing
    r, info = await score(counter, COUNTER_BASE.replace("BODY", "c"), "a check failed")
    assert r == 0.0 and "after clicking '#increment'" in info["checks"][-1]["detail"]
    # a missing element
    r, info = await score(counter, "<span id='count'>0</span>", "a check failed")
    assert r == 0.0 and "no element matches" in info["checks"][0]["detail"]
    # the wrong text
    assert (await score(heading, "<h1>Hello, World!</h1>", "a check failed"))[0] == 0.0
    # a page that throws: the checks pass, the console error fails it
    r, info = await score(counter, COUNTER_BASE.replace("BODY", "++c") + "<script>notDefined();</script>",
                          "console errors")
    assert r == 0.0 and all(c["ok"] for c in info["checks"]) and "notDefined" in info["console_errors"][0]
    assert (await score(heading, "<h1>Hello, WebCoding!</h1><script>console.error('x')</script>",
                        "console errors"))[0] == 0.0
    # an error only on click
    r, _ = await score(counter, COUNTER_BASE.replace("BODY", "(++c, oops.x)"), "console errors")
    assert r == 0.0
    # an external resource is unreachable (the page must be self-contained)
    assert (await score(heading, '<h1>Hello, WebCoding!</h1><img src="http://example.com/a.png">',
                        "console errors"))[0] == 0.0
    # the toggle's text is always shown
    assert (await score(toggle, '<button id="toggle">t</button><p id="details">Secret details revealed.</p>',
                        "a check failed"))[0] == 0.0
    # an alert does not block grading
    assert (await score(heading, "<h1>Hello, WebCoding!</h1><script>alert('hi')</script>", "ok"))[0] == 1.0
    # the layout score is secondary: an overflowing page still passes, with a lower layout score
    r, info = await score(heading, '<h1>Hello, WebCoding!</h1><div style="width: 3000px">wide</div>', "ok")
    assert r == 1.0 and 0.0 <= info["layout_score"] < 0.6
    # no HTML at all
    r, info = await env.verify(heading, "I cannot do that.")
    assert r == 0.0 and info["reason"] == "no HTML in the response"


@needs_chromium
async def test_a_hung_page_times_out_and_the_browser_recovers(tmp_path):
    env = WebCodingEnv(screenshot_dir=tmp_path, timeout_s=3.0)
    try:
        heading = _task(env, "web-heading")
        r, info = await env.verify(heading, "<h1>Hello, WebCoding!</h1><script>while (true) {}</script>")
        assert r == 0.0 and info["reason"].startswith("timed out")
        assert (await env.verify(heading, env.demonstration(heading)))[0] == 1.0
    finally:
        await env.aclose()


@needs_chromium
async def test_without_a_screenshot_dir_no_screenshot_is_taken_and_nothing_is_left_after_close(tmp_path):
    """Screenshots are taken only where asked for (screenshot_dir, task.webcoding_screenshots);
    closed, the env leaves no browser profile, socket dir or served pages behind."""
    from rayrl.config import TaskConfig
    assert WebCodingEnv(TaskConfig(webcoding_screenshots=str(tmp_path))).screenshot_dir == tmp_path
    env = WebCodingEnv(timeout_s=15.0)
    heading = _task(env, "web-heading")
    reward, info = await env.verify(heading, env.demonstration(heading))
    assert reward == 1.0 and info["screenshot"] is None
    browser = env._browser
    socket_dir = os.path.dirname(os.readlink(os.path.join(browser._profile, "SingletonSocket")))
    made = [browser._profile, socket_dir, str(browser.server.root)]
    assert all(map(os.path.isdir, made))
    await env.aclose()
    assert not any(map(os.path.exists, made)), made


def test_extract_html():
    page = "<!doctype html><html><body><h1>x</h1></body></html>"
    assert extract_html(f"Sure:\n```html\n{page}\n```\nDone.") == page
    assert extract_html(f"```\n{page}\n```") == page
    assert extract_html(f"```css\nh1 {{}}\n```\n```html\n{page}\n```") == page
    assert extract_html(page) == page
    assert extract_html("no page here") == ""


def test_generator_is_seeded_and_split():
    env = WebCodingEnv()
    a = [env.sample(random.Random(1)).id for _ in range(3)]
    assert a == [env.sample(random.Random(1)).id for _ in range(3)]
    held = {t.id for t in env.eval_tasks(20)}
    train = {env.sample(random.Random(s)).id for s in range(200)}
    assert len(held) == 20 and not held & train
    for s in range(50):   # every generated row is well-formed
        parse_row(generate(random.Random(s), difficulty=1 + s % 3), f"gen:{s}")


def test_bad_rows_name_the_field(tmp_path):
    with pytest.raises(TaskFormatError, match="gen:1: field 'oracle' is missing"):
        parse_row({"task_id": "x", "instruction": "i", "checks": [{"type": "exists", "selector": "a"}]}, "gen:1")
    with pytest.raises(TaskFormatError, match=r"t.jsonl:2: field 'checks'\[0\]: check type 'hover'"):
        parse_row({"task_id": "x", "instruction": "i", "checks": [{"type": "hover"}], "oracle": ""}, "t.jsonl:2")
    with pytest.raises(TaskFormatError, match="count check field 'n' must be int"):
        parse_row({"task_id": "x", "instruction": "i", "checks": [{"type": "count", "selector": "a", "n": "2"}],
                   "oracle": ""}, "t.jsonl:3")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"task_id": "x"\n')
    with pytest.raises(TaskFormatError, match="t.jsonl:1"):
        load_tasks(bad)


def test_extract_html_unclosed_fence():
    assert extract_html("```html\n<p>cut off") == "<p>cut off"
