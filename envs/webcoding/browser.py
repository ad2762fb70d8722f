"""Headless Chromium over the DevTools protocol (pure Python: aiohttp's websocket client), a
loopback page server, and the grader that runs a task's checks on a page.

Isolation: the model's HTML/CSS/JS runs only inside Chromium's renderer. As root, Chromium needs
`--no-sandbox`, so the containment is the rest of this setup:
- pages are served by our own HTTP server bound to 127.0.0.1 only (an ephemeral port), only from
  a private temp dir, with a size cap;
- Chromium runs with `--disable-background-networking` and friends, a fresh empty
  `--user-data-dir` (removed on close, with the socket dir Chromium makes for it), and every non-loopback request goes to a dead proxy
  (`--proxy-server=127.0.0.1:9`), so a page cannot reach beyond this machine;
- each grade runs in its own browser context (no shared storage or cookies) with a wall-clock
  timeout; a page that hangs the renderer gets its target closed, and the whole browser is
  killed (process group) and restarted if that fails. `Browser.close()` always kills it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-default-apps", "--disable-dev-shm-usage",
         "--mute-audio", "--hide-scrollbars", "--metrics-recording-only", "--password-store=basic",
         "--proxy-server=http://127.0.0.1:9", "--remote-debugging-port=0", "--remote-allow-origins=*")
VIEWPORT = (1024, 768)
MAX_PAGE_BYTES = 1 << 20


class BrowserError(RuntimeError):
    """Chromium could not be started or talked to (infrastructure, not the page's fault)."""


def find_chromium() -> str | None:
    env = os.environ.get("RAYRL_CHROMIUM")
    for path in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if path and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


class PageServer:
    """Serves files under a private temp dir on 127.0.0.1 only; `/favicon.ico` is an empty 204 so
    Chromium's automatic favicon request logs no error."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="rayrl-web-serve-"))
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=1024)
        app.router.add_get("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        if rel == "favicon.ico":
            return web.Response(status=204)
        path = (self.root / rel).resolve()
        if self.root not in path.parents or not path.is_file() or path.stat().st_size > MAX_PAGE_BYTES:
            return web.Response(status=404)
        ctype = "text/html" if path.suffix == ".html" else "application/octet-stream"
        return web.Response(body=path.read_bytes(), content_type=ctype, charset="utf-8")

    def publish(self, html: str) -> tuple[str, Path]:
        """Write `html` as a fresh page; returns its URL and its dir (to remove afterwards)."""
        d = self.root / uuid.uuid4().hex
        d.mkdir()
        (d / "index.html").write_text(html, encoding="utf-8")
        return f"http://127.0.0.1:{self.port}/{d.name}/index.html", d

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        shutil.rmtree(self.root, ignore_errors=True)


class CDP:
    """One websocket to the browser; flattened sessions multiplex per-page traffic on it."""

    def __init__(self, ws, http: aiohttp.ClientSession):
        self.ws, self.http = ws, http
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._listeners: dict[str, list] = {}          # sessionId -> [callback(method, params)]
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if "id" in data:
                    fut = self._pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        if "error" in data:
                            fut.set_exception(BrowserError(f"CDP error: {data['error'].get('message')}"))
                        else:
                            fut.set_result(data.get("result", {}))
                else:
                    for cb in self._listeners.get(data.get("sessionId", ""), ()):
                        cb(data.get("method", ""), data.get("params", {}))
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(BrowserError("the browser connection closed"))
            self._pending.clear()

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 10.0) -> dict:
        if self._reader.done():
            raise BrowserError("the browser connection is closed")
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(msg_id, None)

    def listen(self, session: str, cb) -> None:
        self._listeners.setdefault(session, []).append(cb)

    def unlisten(self, session: str) -> None:
        self._listeners.pop(session, None)

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.http.close()


class Browser:
    """One headless Chromium process, reused across grades (each in its own browser context)."""

    def __init__(self, executable: str | None = None, start_timeout: float = 20.0):
        self.executable = executable or find_chromium()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.cdp: CDP | None = None
        self.server = PageServer()
        self._profile: str | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> "Browser":
        async with self._lock:
            await self._start_locked()
        return self

    async def _start_locked(self) -> None:
        if self.alive:
            return
        if self.executable is None:
            raise BrowserError("Chromium is not installed (Debian packages chromium, chromium-driver)")
        if self.server.port == 0:
            await self.server.start()
        await self._kill()
        self._profile = tempfile.mkdtemp(prefix="rayrl-chromium-")
        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self._profile}",
             f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        port_file = Path(self._profile) / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or loop.time() > deadline:
                await self._kill()
                raise BrowserError(f"Chromium did not start ({self.executable})")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=64 << 20)
        except Exception as err:
            await http.close()
            await self._kill()
            raise BrowserError(f"cannot connect to Chromium's DevTools: {err}") from err
        self.cdp = CDP(ws, http)

    @property
    def alive(self) -> bool:
        return (self.proc is not None and self.proc.poll() is None and self.cdp is not None
                and not self.cdp._reader.done())

    async def _kill(self) -> None:
        if self.cdp is not None:
            await self.cdp.close()
            self.cdp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
            self.proc = None
        self._remove_profile()

    def _remove_profile(self) -> None:
        """The profile dir, and the socket dir Chromium made for it in /tmp, which only Chromium's
        own orderly exit removes (org.chromium.Chromium.*, one per start, left by every kill)."""
        if not self._profile:
            return
        link = Path(self._profile) / "SingletonSocket"
        if link.is_symlink():
            socket_dir = Path(os.readlink(link)).parent
            if socket_dir.name.startswith("org.chromium.Chromium."):
                shutil.rmtree(socket_dir, ignore_errors=True)
        shutil.rmtree(self._profile, ignore_errors=True)
        self._profile = None

    def kill_now(self) -> None:
        """Synchronous last resort (e.g. the event loop that started it is gone): kill the
        process group and remove the profile and served pages."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc, self.cdp = None, None
        self._remove_profile()
        shutil.rmtree(self.server.root, ignore_errors=True)

    async def restart(self) -> None:
        async with self._lock:
            await self._kill()
            await self._start_locked()

    async def close(self) -> None:
        async with self._lock:
            await self._kill()
            await self.server.close()

    async def __aenter__(self) -> "Browser":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open_page(self) -> "Page":
        if not self.alive:
            await self.start()
        cdp = self.cdp
        ctx = (await cdp.send("Target.createBrowserContext", {"disposeOnDetach": True}))["browserContextId"]
        target = (await cdp.send("Target.createTarget", {"url": "about:blank", "browserContextId": ctx,
                                                         "width": VIEWPORT[0], "height": VIEWPORT[1]}))["targetId"]
        session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, cdp, ctx, target, session)
        cdp.listen(session, page._on_event)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            await cdp.send(method, session=session)
        await cdp.send("Emulation.setDeviceMetricsOverride", {"width": VIEWPORT[0], "height": VIEWPORT[1],
                                                              "deviceScaleFactor": 1, "mobile": False},
                       session=session)
        return page


class Page:
    def __init__(self, browser: Browser, cdp: CDP, ctx: str, target: str, session: str):
        self.browser, self.cdp, self.ctx, self.target, self.session = browser, cdp, ctx, target, session
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self._loaded = asyncio.Event()

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.errors.append("uncaught: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.errors.append(f"{e.get('source', 'log')}: {e.get('text', '')} {e.get('url', '')}".strip())
        elif method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Page.javascriptDialogOpening":   # alert/confirm/prompt would block the page
            self.dialogs.append(params.get("message", ""))
            task = asyncio.ensure_future(self.send("Page.handleJavaScriptDialog", {"accept": True}))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def send(self, method: str, params: dict | None = None, timeout: float = 10.0):
        return self.cdp.send(method, params, session=self.session, timeout=timeout)

    async def goto(self, url: str, timeout: float) -> None:
        self._loaded.clear()
        nav = await self.send("Page.navigate", {"url": url}, timeout=timeout)
        if nav.get("errorText"):
            raise BrowserError(f"navigation failed: {nav['errorText']}")
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def eval(self, expression: str, timeout: float = 5.0):
        r = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"].get("exception", {}).get("description", "evaluation failed"))
        return r.get("result", {}).get("value")

    async def settle(self) -> None:
        """Let pending timers, microtasks and two frames run."""
        await self.eval("new Promise(r => setTimeout(() => requestAnimationFrame(() => "
                        "requestAnimationFrame(() => r(true))), 0))")

    async def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                         "clickCount": 0 if kind == "mouseMoved" else 1})

    async def type_text(self, text: str) -> None:
        await self.send("Input.insertText", {"text": text})

    async def screenshot(self, path: Path) -> None:
        data = (await self.send("Page.captureScreenshot", {"format": "png"}, timeout=15.0))["data"]
        path.write_bytes(base64.b64decode(data))

    async def close(self) -> None:
        self.cdp.unlisten(self.session)
        try:
            await self.cdp.send("Target.closeTarget", {"targetId": self.target}, timeout=3.0)
            await self.cdp.send("Target.disposeBrowserContext", {"browserContextId": self.ctx}, timeout=3.0)
        except (BrowserError, asyncio.TimeoutError):
            await self.browser.restart()      # a hung renderer: kill the whole browser
