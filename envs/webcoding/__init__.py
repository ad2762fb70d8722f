"""WebCoding: the model writes an HTML page (HTML/CSS/JS in one document); it is graded in
headless Chromium with the task's DOM and behaviour checks and no console errors, with a secondary
layout score and, if asked for (`task.webcoding_screenshots`), a screenshot of the final page
(see envs/webcoding/grader.py for the check types and envs/webcoding/browser.py for how the
browser is isolated).

Tasks are JSONL rows: `task_id`, `instruction`, `checks` (a list of check objects) and `oracle`
(an HTML document that passes them, for demonstrations and replay tests). The seeded generator
makes such tasks from templates (counter, todo list, heading, styled card, toggle, table) with
random ids, texts and counts; difficulty puts several components on one page.

Tiny mode (difficulty 0) is for the 2-layer character-level model, which cannot copy random strings
from its prompt. Each task asks for one component on a minimal page
(`<!doctype html><html><body>...</body></html>`, no head or style) and fixes every id, so the answer
is determined by the kind of component plus one or two discrete features:
- heading, id 'title': main heading or subheading (h1/h2) x text;
- list `<ul id='items'>`: 1-3 items x text (every item reads the text);
- counter, button 'inc' and span 'count': text (the button's label) x start value 0/1, graded by
  clicking a number of times that the features determine (one prompt is one task);
- toggle, button 'btn' and paragraph 'msg': text x at first shown/hidden.
The text is one of four two-word phrases (TINY_TEXTS) with distinctive letters. Measured: four-letter
words or digits that the answer has to repeat were only learned after 300-400 SFT steps, while these
longer phrases and word-valued features ("shown"/"hidden") are learned in about 200. The pages use
inline handlers on the elements' named globals (`count.textContent++`, `msg.hidden=!msg.hidden`).
Eight openings and four closing sentences that do not change the answer make the prompts distinct:
1152 tasks with 36 distinct answers, prompt plus answer under 350 characters, and the task-id hash
split holds out 235 of them. Held-out prompts never occur in training, but their answers (and so
every feature combination) do, with other wording.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import uuid
from pathlib import Path

from envs.rows import TaskFormatError, check_fields, read_jsonl
from envs.base import GeneratedEnv, Task
from envs.webcoding.browser import Browser, BrowserError, find_chromium
from envs.webcoding.grader import grade, validate_check

SAMPLES = Path(__file__).with_name("samples.jsonl")
TINY_FORMAT = "\nReply in a ```html block."
_FIELDS = {"task_id": str, "instruction": str, "checks": list, "oracle": str}
FORMAT = ("\n\nReply with one complete, self-contained HTML document (inline CSS and JS, no external "
          "resources) in a ```html code block.")


def parse_row(row, where: str) -> dict:
    check_fields(row, where, _FIELDS)
    if not row["checks"]:
        raise TaskFormatError(f"{where}: field 'checks' must not be empty")
    for i, check in enumerate(row["checks"]):
        try:
            validate_check(check, f"{where}: field 'checks'[{i}]")
        except ValueError as err:
            raise TaskFormatError(str(err)) from None
    return {k: row[k] for k in _FIELDS}


def load_tasks(path: str | Path) -> list[dict]:
    return read_jsonl(path, parse_row)


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)


def extract_html(response: str) -> str:
    """The page in a response: the first ```html fence, else the first fence that looks like
    HTML, else the raw text if it contains a tag; "" if none."""
    fences = _FENCE.findall(response)
    for lang, body in fences:
        if lang.lower() in ("html", "htm", "xhtml"):
            return body.strip()
    for _, body in fences:
        if "<" in body:
            return body.strip()
    return response.strip() if re.search(r"<[a-zA-Z!]", response) else ""


# ---------------------------------------------------------------- generator

_WORDS = ("apple river stone cloud maple ember harbor lantern meadow orbit pepper quartz signal "
          "timber velvet willow zephyr copper falcon glacier").split()


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.randint(10, 99)}"


def _phrase(rng: random.Random, n: int = 3) -> str:
    return " ".join(rng.choice(_WORDS).capitalize() for _ in range(n))


def _counter(rng):
    b, s, k = _name(rng), _name(rng), rng.randint(1, 5)
    return (f"Add a button with id '{b}' and a span with id '{s}' that shows 0; each click on the "
            f"button increases the number in the span by one.",
            [{"type": "text", "selector": f"#{s}", "contains": "0"},
             {"type": "click", "selector": f"#{b}", "times": k, "then": {"selector": f"#{s}", "contains": str(k)}}],
            f'<button id="{b}">Add one</button> <span id="{s}">0</span>',
            f"(() => {{ let n = 0; const s = document.getElementById('{s}');\n"
            f"  document.getElementById('{b}').addEventListener('click', () => {{ s.textContent = ++n; }}); }})();")


def _todo(rng):
    i, b, ul = _name(rng), _name(rng), _name(rng)
    items = [_phrase(rng, 2) for _ in range(rng.randint(1, 3))]
    checks = [{"type": "count", "selector": f"#{ul} li", "n": 0}]
    for n, item in enumerate(items, 1):
        checks += [{"type": "fill", "selector": f"#{i}", "value": item},
                   {"type": "click", "selector": f"#{b}",
                    "then": [{"type": "count", "selector": f"#{ul} li", "n": n},
                             {"selector": f"#{ul} li:last-child", "contains": item}]}]
    return (f"Make a todo list: a text input with id '{i}', a button with id '{b}' and an empty list "
            f"<ul id='{ul}'>. Clicking the button appends the input's text as a new <li> to the list.",
            checks,
            f'<input id="{i}" type="text"> <button id="{b}">Add</button>\n<ul id="{ul}"></ul>',
            f"(() => {{ const i = document.getElementById('{i}'), ul = document.getElementById('{ul}');\n"
            f"  document.getElementById('{b}').addEventListener('click', () => {{\n"
            f"    const li = document.createElement('li'); li.textContent = i.value; ul.appendChild(li); i.value = ''; }}); }})();")


def _heading(rng):
    text, h = _phrase(rng, 3), _name(rng)
    return (f"Add a level-one heading with id '{h}' that reads '{text}'.",
            [{"type": "exists", "selector": f"h1#{h}"}, {"type": "text", "selector": f"#{h}", "contains": text}],
            f'<h1 id="{h}">{text}</h1>', "")


def _card(rng):
    c, title, body = _name(rng), _phrase(rng, 2), _phrase(rng, 5)
    radius = rng.choice([4, 6, 8, 12])
    return (f"Add a card: a div with id '{c}' and a {radius}px border radius, holding an <h2> titled "
            f"'{title}' and a <p> with the text '{body}'.",
            [{"type": "text", "selector": f"#{c} h2", "contains": title},
             {"type": "text", "selector": f"#{c} p", "contains": body},
             {"type": "style", "selector": f"#{c}", "property": "border-top-left-radius", "equals": f"{radius}px"}],
            f'<div id="{c}" style="border: 1px solid #ccc; border-radius: {radius}px; padding: 12px; '
            f'max-width: 320px; box-shadow: 0 2px 6px rgba(0,0,0,.15)">\n  <h2>{title}</h2>\n  <p>{body}</p>\n</div>', "")


def _toggle(rng):
    b, p, text = _name(rng), _name(rng), _phrase(rng, 3)
    return (f"Add a button with id '{b}' and a paragraph with id '{p}' reading '{text}'. The paragraph "
            f"starts hidden; each click on the button shows or hides it.",
            [{"type": "visible", "selector": f"#{p}", "visible": False},
             {"type": "click", "selector": f"#{b}", "then": [{"type": "visible", "selector": f"#{p}", "visible": True},
                                                            {"selector": f"#{p}", "contains": text}]},
             {"type": "click", "selector": f"#{b}", "then": {"type": "visible", "selector": f"#{p}", "visible": False}}],
            f'<button id="{b}">Toggle</button>\n<p id="{p}" hidden>{text}</p>',
            f"document.getElementById('{b}').addEventListener('click', () => {{\n"
            f"  const p = document.getElementById('{p}'); p.hidden = !p.hidden; }});")


def _table(rng):
    t, n = _name(rng), rng.randint(2, 8)
    rows = [(_phrase(rng, 1), rng.randint(1, 100)) for _ in range(n)]
    body = "\n".join(f"    <tr><td>{a}</td><td>{v}</td></tr>" for a, v in rows)
    return (f"Add a table with id '{t}': a header row (in <thead>) with the columns 'Name' and 'Score', "
            f"and {n} body rows (in <tbody>), in this order: "
            + "; ".join(f"{a}, {v}" for a, v in rows) + ".",
            [{"type": "count", "selector": f"#{t} tbody tr", "n": n},
             {"type": "text", "selector": f"#{t} thead", "contains": "Name"},
             {"type": "text", "selector": f"#{t} tbody tr:first-child", "contains": rows[0][0]},
             {"type": "text", "selector": f"#{t} tbody tr:last-child", "contains": str(rows[-1][1])}],
            f'<table id="{t}">\n  <thead><tr><th>Name</th><th>Score</th></tr></thead>\n  <tbody>\n{body}\n  </tbody>\n</table>', "")


TEMPLATES = {"counter": _counter, "todo": _todo, "heading": _heading, "card": _card, "toggle": _toggle, "table": _table}


def page(body: str, script: str = "", title: str = "Task") -> str:
    script = f"\n<script>\n{script}\n</script>" if script.strip() else ""
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
            f'<style>body {{ font-family: sans-serif; margin: 24px; }}</style>\n</head>\n<body>\n'
            f'{body}{script}\n</body>\n</html>\n')


def generate(rng: random.Random, difficulty: int = 1) -> dict:
    """A page of `difficulty` components from the templates, all of whose checks must pass."""
    parts = [TEMPLATES[rng.choice(sorted(TEMPLATES))](rng) for _ in range(max(1, difficulty))]
    task = {"instruction": "Write a web page. " + " ".join(p[0] for p in parts),
            "checks": [c for p in parts for c in p[1]],
            "oracle": page("\n".join(p[2] for p in parts), "\n".join(p[3] for p in parts if p[3]))}
    task["task_id"] = "web-" + hashlib.blake2b(json.dumps(task, sort_keys=True).encode(), digest_size=6).hexdigest()
    return task


# ---------------------------------------------------------------- tiny mode (difficulty 0)

TINY_TEXTS = ("Jazz Night", "Quiz Time", "Zoo Tours", "Yoga Class")
TINY_OPENINGS = ("Write a web page", "Make a web page", "Build a small page", "Create an HTML page",
                 "Write a short page", "Make a simple page", "Build a web page", "Create a page")
TINY_CLOSINGS = ("", " Keep it short.", " No CSS needed.", " Any layout is fine.")


def tiny_page(body: str) -> str:
    return f"<!doctype html><html><body>{body}</body></html>\n"


def _tiny_heading(rng):
    sub, text = rng.random() < 0.5, rng.choice(TINY_TEXTS)
    level = 2 if sub else 1
    return (f"with a {'subheading' if sub else 'main heading'} (h{level}), id 'title', reading '{text}'.",
            [{"type": "exists", "selector": f"h{level}#title"}, {"type": "text", "selector": "#title", "contains": text}],
            f'<h{level} id="title">{text}</h{level}>')


def _tiny_list(rng):
    n, text = rng.randint(1, 3), rng.choice(TINY_TEXTS)
    return (f"with a list <ul id='items'> of {n} item{'s' if n > 1 else ''}, each reading '{text}'.",
            [{"type": "count", "selector": "ul#items li", "n": n},
             {"type": "text", "selector": "#items li:first-child", "contains": text},
             {"type": "text", "selector": "#items li:last-child", "contains": text}],
            '<ul id="items">' + f"<li>{text}</li>" * n + "</ul>")


def _tiny_counter(rng):
    start, text = rng.randint(0, 1), rng.choice(TINY_TEXTS)
    k = 1 + (2 * TINY_TEXTS.index(text) + start) % 5        # clicks: set by the features (one prompt, one task)
    return (f"with a button id 'inc' labelled '{text}' and a span id 'count' showing {start}; "
            f"each click adds one to the span.",
            [{"type": "text", "selector": "button#inc", "contains": text},
             {"type": "text", "selector": "span#count", "contains": str(start)},
             {"type": "click", "selector": "#inc", "times": k, "then": {"selector": "#count", "contains": str(start + k)}}],
            f'<button id="inc" onclick="count.textContent++">{text}</button><span id="count">{start}</span>')


def _tiny_toggle(rng):
    shown, text = rng.random() < 0.5, rng.choice(TINY_TEXTS)
    on = [{"type": "visible", "selector": "p#msg", "visible": True}, {"type": "text", "selector": "p#msg", "contains": text}]
    off = [{"type": "visible", "selector": "p#msg", "visible": False}]
    first, second = (on, off) if shown else (off, on)
    return (f"with a button id 'btn' and a paragraph id 'msg' reading '{text}', at first "
            f"{'shown' if shown else 'hidden'}; each click shows or hides it.",
            [*first, {"type": "click", "selector": "button#btn", "then": second},
             {"type": "click", "selector": "#btn", "then": first}],
            f'<button id="btn" onclick="msg.hidden=!msg.hidden">Toggle</button>'
            f'<p id="msg"{"" if shown else " hidden"}>{text}</p>')


TINY_TEMPLATES = {"heading": _tiny_heading, "list": _tiny_list, "counter": _tiny_counter, "toggle": _tiny_toggle}


def generate_tiny(rng: random.Random) -> dict:
    """A difficulty-0 task: one component from TINY_TEMPLATES on a minimal page."""
    what, checks, body = TINY_TEMPLATES[rng.choice(sorted(TINY_TEMPLATES))](rng)
    task = {"instruction": f"{rng.choice(TINY_OPENINGS)} {what}{rng.choice(TINY_CLOSINGS)}", "checks": checks,
            "oracle": tiny_page(body)}
    task["task_id"] = "web0-" + hashlib.blake2b(json.dumps(task, sort_keys=True).encode(), digest_size=6).hexdigest()
    return task


# ---------------------------------------------------------------- environment

class WebCodingEnv(GeneratedEnv):
    """Grades pages in one shared headless Chromium (started lazily on the running event loop,
    restarted if it dies); at most `concurrency` pages are graded at once.

    With a `screenshot_dir` (or the config's `webcoding_screenshots`) every grade saves a PNG of
    the final page there; without, none is taken (no reward reads it, and it cost about 5% of a
    grade's time)."""

    domain = "webcoding"

    def __init__(self, cfg=None, seed: int = 0, screenshot_dir: str | Path | None = None,
                 timeout_s: float = 20.0, concurrency: int = 4):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.difficulty = getattr(cfg, "webcoding_difficulty", 1)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)
        self.timeout_s, self.concurrency = timeout_s, concurrency
        screenshot_dir = screenshot_dir or getattr(cfg, "webcoding_screenshots", "")
        self.screenshot_dir = Path(screenshot_dir).expanduser().absolute() if screenshot_dir else None
        self._browser: Browser | None = None
        self._loop = None
        self._sem: asyncio.Semaphore | None = None

    def generate_row(self, rng: random.Random) -> dict:
        return generate_tiny(rng) if self.difficulty == 0 else generate(rng, self.difficulty)

    def eval_tasks(self, n: int) -> list[Task]:
        if self.difficulty != 0:
            return super().eval_tasks(n)
        from envs.rows import held_out       # tiny mode has finitely many tasks: fail, never loop forever
        rng, out = random.Random(self.eval_seed), {}
        for _ in range(200_000):
            if len(out) >= n:
                return list(out.values())
            row = self.generate_row(rng)
            if held_out(row["task_id"], self.eval_fraction):
                out.setdefault(row["task_id"], self.to_task(row))
        raise ValueError(f"webcoding difficulty 0 has only {len(out)} held-out tasks; lower task.eval_size")

    @staticmethod
    def available() -> bool:
        return find_chromium() is not None

    @staticmethod
    def to_task(row: dict) -> Task:
        tiny = row["task_id"].startswith("web0-")        # a difficulty-0 row: the short format line
        return Task(id=row["task_id"], prompt=row["instruction"] + (TINY_FORMAT if tiny else FORMAT), answer="",
                    domain="webcoding", meta=row)

    def demonstration(self, task: Task) -> str:
        return f"```html\n{task.meta['oracle']}```"

    async def _get_browser(self) -> Browser:
        loop = asyncio.get_running_loop()
        if self._browser is not None and self._loop is not loop:   # a browser from a finished loop
            self._browser.kill_now()
            self._browser = None
        if self._browser is None:
            self._browser, self._loop = Browser(), loop
            self._sem = asyncio.Semaphore(self.concurrency)
        if not self._browser.alive:
            await self._browser.start()
        return self._browser

    async def verify(self, task: Task, response: str) -> tuple[float, dict]:
        """Extract the page from `response` and grade it. info: per-check results, console errors,
        `screenshot` (a PNG path; None without a screenshot dir), `layout_score` (secondary, not in
        the reward), `reason`."""
        html = extract_html(response)
        if not html:
            return 0.0, {"reason": "no HTML in the response", "checks": [], "console_errors": [],
                         "screenshot": None, "layout_score": 0.0}
        from rayrl.sandbox.base import SandboxInfraError
        try:
            browser = await self._get_browser()
            shot = self.screenshot_dir / f"{task.id}-{uuid.uuid4().hex[:8]}.png" if self.screenshot_dir else None
            async with self._sem:
                return await grade(browser, html, task.meta["checks"], shot, timeout=self.timeout_s)
        except BrowserError as err:
            raise SandboxInfraError(f"webcoding browser: {err}") from err

    async def aclose(self) -> None:
        if self._browser is not None:
            if self._loop is asyncio.get_running_loop():
                await self._browser.close()
            else:
                self._browser.kill_now()
            self._browser = None
