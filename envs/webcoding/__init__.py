"""WebCoding: the model writes an HTML page (HTML/CSS/JS in one document); it is graded in
headless Chromium with the task's DOM and behaviour checks, no console errors, a saved screenshot
and a secondary layout score (see envs/webcoding/grader.py for the check types and
envs/webcoding/browser.py for how the browser is isolated).

Tasks are JSONL rows: `task_id`, `instruction`, `checks` (a list of check objects) and `oracle`
(an HTML document that passes them, for demonstrations and replay tests). The seeded generator
makes such tasks from templates (counter, todo list, heading, styled card, toggle, table) with
random ids, texts and counts; difficulty puts several components on one page.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import tempfile
import uuid
from pathlib import Path

from envs.rows import TaskFormatError, check_fields, read_jsonl
from envs.base import GeneratedEnv, Task
from envs.webcoding.browser import Browser, BrowserError, find_chromium
from envs.webcoding.grader import grade, validate_check

SAMPLES = Path(__file__).with_name("samples.jsonl")
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


# ---------------------------------------------------------------- environment

class WebCodingEnv(GeneratedEnv):
    """Grades pages in one shared headless Chromium (started lazily on the running event loop,
    restarted if it dies); at most `concurrency` pages are graded at once."""

    domain = "webcoding"

    def __init__(self, cfg=None, seed: int = 0, screenshot_dir: str | Path | None = None,
                 timeout_s: float = 20.0, concurrency: int = 4):
        super().__init__(getattr(cfg, "tool_latency", "none"), seed)
        self.difficulty = getattr(cfg, "webcoding_difficulty", 1)
        self.eval_fraction = getattr(cfg, "eval_fraction", 0.2)
        self.timeout_s, self.concurrency = timeout_s, concurrency
        self.screenshot_dir = Path(screenshot_dir) if screenshot_dir else None
        self._browser: Browser | None = None
        self._loop = None
        self._sem: asyncio.Semaphore | None = None

    def generate_row(self, rng: random.Random) -> dict:
        return generate(rng, self.difficulty)

    @staticmethod
    def available() -> bool:
        return find_chromium() is not None

    @staticmethod
    def to_task(row: dict) -> Task:
        return Task(id=row["task_id"], prompt=row["instruction"] + FORMAT, answer="", domain="webcoding", meta=row)

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
        `screenshot` (a PNG path), `layout_score` (secondary, not in the reward), `reason`."""
        html = extract_html(response)
        if not html:
            return 0.0, {"reason": "no HTML in the response", "checks": [], "console_errors": [],
                         "screenshot": None, "layout_score": 0.0}
        from rayrl.sandbox.base import SandboxInfraError
        try:
            browser = await self._get_browser()
            if self.screenshot_dir is None:
                self.screenshot_dir = Path(tempfile.mkdtemp(prefix="rayrl-webcoding-shots-"))
            shot = self.screenshot_dir / f"{task.id}-{uuid.uuid4().hex[:8]}.png"
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
