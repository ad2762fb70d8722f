"""Grade a page against a task's checks in headless Chromium.

Checks run in order on one live page (so a `fill` then a `click` is a user interaction):
- `{"type": "exists", "selector"}`: the selector matches an element;
- `{"type": "text", "selector", "contains"}`: the element's rendered text (innerText, whitespace
  collapsed; hidden text does not count) contains the string;
- `{"type": "count", "selector", "n"}`: exactly n elements match;
- `{"type": "visible", "selector", "visible": bool}`: the element exists and is (not) rendered;
- `{"type": "style", "selector", "property", "equals"}`: a computed style value, e.g.
  `{"property": "border-radius", "equals": "8px"}` (colours compare as `rgb(r, g, b)`);
- `{"type": "fill", "selector", "value"}`: focus the input and type the value (real input events);
- `{"type": "click", "selector", "then": CHECK | [CHECK...], "times": 1}`: a real mouse click at
  the element's centre (it must be visible and not covered), `times` times, then the `then`
  checks (a check without `type` is a `text` check), polled for up to a second.

reward = 1 iff every check passes and the page logged no console error (console.error, an uncaught
exception, a failed resource load). A screenshot of the final state is saved, and a secondary
layout score in [0, 1] (half: the fraction of rendered elements horizontally inside the viewport;
half: no horizontal overflow) is reported in the info, not in the reward.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from envs.webcoding.browser import Browser, BrowserError, Page

CHECK_FIELDS = {"exists": {"selector": str}, "text": {"selector": str, "contains": str},
                "count": {"selector": str, "n": int}, "visible": {"selector": str, "visible": bool},
                "style": {"selector": str, "property": str, "equals": str},
                "fill": {"selector": str, "value": str}, "click": {"selector": str}}
THEN_POLL_S = 1.0

_JS_TEXT = "(e => (e.innerText ?? e.textContent ?? '').replace(/\\s+/g, ' ').trim())"
_JS_VISIBLE = ("(e => { const s = getComputedStyle(e); return e.getClientRects().length > 0 && "
               "s.visibility !== 'hidden' && s.display !== 'none' && parseFloat(s.opacity) > 0; })")
_JS_LAYOUT = """(() => {
  const W = document.documentElement.clientWidth;
  const els = [...document.body.querySelectorAll('*')].filter(e => {
    const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden';
  });
  const inside = els.filter(e => { const r = e.getBoundingClientRect(); return r.left >= -1 && r.right <= W + 1; });
  return {elements: els.length, inside: inside.length, viewport_width: W,
          scroll_width: document.documentElement.scrollWidth,
          scroll_height: document.documentElement.scrollHeight};
})()"""


def validate_check(check, where: str, nested: bool = False) -> None:
    """Raise ValueError naming `where` if `check` is malformed."""
    if not isinstance(check, dict):
        raise ValueError(f"{where}: a check must be a JSON object")
    kind = check.get("type", "text" if nested else None)
    if kind not in CHECK_FIELDS:
        raise ValueError(f"{where}: check type {kind!r} is not one of {', '.join(CHECK_FIELDS)}")
    for field, t in CHECK_FIELDS[kind].items():
        if not isinstance(check.get(field), t) or (t is int and isinstance(check.get(field), bool)):
            raise ValueError(f"{where}: {kind} check field {field!r} must be {t.__name__}")
    if kind == "click":
        then = check.get("then", [])
        for i, sub in enumerate(then if isinstance(then, list) else [then]):
            if isinstance(sub, dict) and sub.get("type") in ("click", "fill"):
                raise ValueError(f"{where}: click 'then' checks cannot be actions")
            validate_check(sub, f"{where}.then[{i}]", nested=True)
        times = check.get("times", 1)
        if not isinstance(times, int) or isinstance(times, bool) or not 1 <= times <= 20:
            raise ValueError(f"{where}: click field 'times' must be an int in 1..20")


async def _query(page: Page, selector: str, body: str):
    """Evaluate `body` (a JS expression over `e`, the first match, or `all`) for `selector`."""
    sel = json.dumps(selector)
    return await page.eval(f"(() => {{ const all = document.querySelectorAll({sel}); const e = all[0] ?? null; "
                           f"return {body}; }})()")


async def _assert(page: Page, check: dict) -> tuple[bool, str]:
    kind, sel = check.get("type", "text"), check["selector"]
    if kind == "exists":
        ok = await _query(page, sel, "e !== null")
        return ok, "" if ok else f"no element matches {sel!r}"
    if kind == "count":
        n = await _query(page, sel, "all.length")
        return n == check["n"], f"{n} elements match {sel!r}, expected {check['n']}"
    if kind == "visible":
        v = await _query(page, sel, f"e === null ? null : {_JS_VISIBLE}(e)")
        if v is None:
            return False, f"no element matches {sel!r}"
        return v == check["visible"], f"{sel!r} is {'visible' if v else 'hidden'}"
    if kind == "style":
        prop = json.dumps(check["property"])
        v = await _query(page, sel, f"e === null ? null : getComputedStyle(e).getPropertyValue({prop}).trim()")
        if v is None:
            return False, f"no element matches {sel!r}"
        return v == check["equals"], f"{check['property']} of {sel!r} is {v!r}, expected {check['equals']!r}"
    text = await _query(page, sel, f"e === null ? null : {_JS_TEXT}(e)")
    if text is None:
        return False, f"no element matches {sel!r}"
    ok = " ".join(check["contains"].split()) in text
    return ok, "" if ok else f"text of {sel!r} is {text[:200]!r}, expected it to contain {check['contains']!r}"


async def _run_check(page: Page, check: dict) -> tuple[bool, str]:
    kind, sel = check["type"], check["selector"]
    if kind == "fill":
        found = await _query(page, sel, "e === null ? false : (e.focus(), e.value = '', "
                                        "e.dispatchEvent(new Event('input', {bubbles: true})), true)")
        if not found:
            return False, f"no element matches {sel!r}"
        await page.type_text(check["value"])
        await page.settle()
        return True, ""
    if kind != "click":
        return await _assert(page, check)
    for _ in range(check.get("times", 1)):
        spot = await _query(page, sel, f"""e === null ? 'missing' : (() => {{
            e.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = e.getBoundingClientRect();
            if (r.width === 0 || r.height === 0 || !{_JS_VISIBLE}(e)) return 'hidden';
            const x = r.left + r.width / 2, y = r.top + r.height / 2, hit = document.elementFromPoint(x, y);
            if (hit === null || !(hit === e || e.contains(hit) || hit.contains(e))) return 'covered';
            return [x, y]; }})()""")
        if not isinstance(spot, list):
            return False, {"missing": f"no element matches {sel!r}", "hidden": f"{sel!r} is not visible",
                           "covered": f"{sel!r} is covered by another element"}[spot]
        await page.click(*spot)
        await page.settle()
    then = check.get("then", [])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + THEN_POLL_S
    for sub in then if isinstance(then, list) else [then]:
        while True:
            ok, detail = await _assert(page, sub)
            if ok or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        if not ok:
            return False, f"after clicking {sel!r}: {detail}"
    return True, ""


def layout_score(m: dict) -> float:
    inside = m["inside"] / m["elements"] if m["elements"] else 1.0
    return round(0.5 * inside + 0.5 * float(m["scroll_width"] <= m["viewport_width"] + 1), 4)


async def grade(browser: Browser, html: str, checks: list[dict], screenshot: str | Path | None = None,
                timeout: float = 20.0) -> tuple[float, dict]:
    """Serve `html` on loopback, open it, run `checks`; returns (reward, info). Raises BrowserError
    when the browser itself failed (infrastructure), never for the page's faults."""
    info: dict = {"checks": [], "console_errors": [], "screenshot": None, "layout_score": 0.0}
    if not html.strip():
        return 0.0, {**info, "reason": "no HTML in the response"}
    url, page_dir = browser.server.publish(html)
    page = await browser.open_page()
    try:
        await asyncio.wait_for(_grade(page, url, checks, screenshot, info), timeout)
    except asyncio.TimeoutError:
        info["reason"] = f"timed out after {timeout:g}s"
    except RuntimeError as err:   # an evaluation the page broke (e.g. it replaced document.body)
        if isinstance(err, BrowserError) and not browser.alive:
            raise
        info["reason"] = f"grading error: {err}"
    finally:
        info["console_errors"] = list(page.errors)
        info["dialogs"] = list(page.dialogs)
        await page.close()
        shutil.rmtree(page_dir, ignore_errors=True)
    passed = all(c["ok"] for c in info["checks"]) and len(info["checks"]) == len(checks)
    if "reason" not in info:
        info["reason"] = ("console errors" if info["console_errors"] else
                          "ok" if passed else "a check failed")
    reward = float(passed and not info["console_errors"] and info["reason"] == "ok")
    return reward, info


async def _grade(page: Page, url: str, checks: list[dict], screenshot, info: dict) -> None:
    await page.goto(url, timeout=10.0)
    await page.settle()
    for check in checks:
        try:
            ok, detail = await _run_check(page, check)
        except RuntimeError as err:        # e.g. an invalid selector
            if isinstance(err, BrowserError):
                raise
            ok, detail = False, f"error: {str(err).splitlines()[0]}"
        info["checks"].append({"type": check["type"], "selector": check["selector"], "ok": bool(ok),
                               **({"detail": detail} if not ok else {})})
    await page.settle()
    metrics = await page.eval(_JS_LAYOUT)
    info["layout"], info["layout_score"] = metrics, layout_score(metrics)
    if screenshot is not None:
        path = Path(screenshot)
        path.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path)
        info["screenshot"] = str(path)
