"""Load a page in headless Chromium over the DevTools protocol and report what it showed.

Console errors are caught as the browser reports them (``Runtime.consoleAPICalled`` of
type error/assert, ``Runtime.exceptionThrown``, ``Log.entryAdded`` at level error: a
failed resource load lands there), not by scraping log text. The page is inspected
after its ``load`` event: every ``<img>`` must have decoded (``naturalWidth > 0``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 60.0


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class PageReport:
    errors: list[str] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    title: str = ""
    text: str = ""


INSPECT = """JSON.stringify({
  title: document.title,
  text: document.body.innerText,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,
                                                  width: i.naturalWidth})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
    header: Array.from(t.querySelectorAll('th')).map(h => h.innerText),
    rows: t.querySelectorAll('tbody tr').length}))
})"""


def load_page(path: Path) -> PageReport:
    """Open ``path`` in headless Chromium and return its errors, images and tables."""
    import websocket  # websocket-client (dev dependency)

    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no chromium binary")
    # Chromium's helper processes may still write to the profile as it exits: kill the
    # whole process group, and never fail a test on the temporary profile's clean-up.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",  # CI containers run as root
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            return _drive(proc, Path(path), websocket)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _drive(proc: subprocess.Popen, path: Path, websocket) -> PageReport:
    deadline = time.monotonic() + TIMEOUT_S
    port = None
    while port is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"chromium exited ({proc.returncode}) before DevTools started")
        match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if match:
            port = int(match.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError("chromium did not start DevTools in time")
    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list").read())
    page = next(t for t in targets if t.get("type") == "page")
    ws = websocket.create_connection(
        page["webSocketDebuggerUrl"], timeout=TIMEOUT_S, suppress_origin=True
    )
    report = PageReport()
    ids = iter(range(1, 10_000))

    def send(method: str, **params) -> int:
        msg_id = next(ids)
        ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        return msg_id

    def pump(until) -> dict:
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            method = msg.get("method", "")
            params = msg.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
                report.errors.append("console: " + " ".join(map(str, args)))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                report.errors.append(f"exception: {text}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                entry = params["entry"]
                report.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}")
            if until(msg):
                return msg
        raise RuntimeError("timed out waiting for the page")

    try:
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            wanted = send(method)
            pump(lambda m, wanted=wanted: m.get("id") == wanted)
        send("Page.navigate", url=path.resolve().as_uri())
        pump(lambda m: m.get("method") == "Page.loadEventFired")
        wanted = send("Runtime.evaluate", expression=INSPECT, returnByValue=True)
        result = pump(lambda m: m.get("id") == wanted)
        # Let late console messages arrive before closing.
        wanted = send("Runtime.evaluate", expression="1")
        pump(lambda m: m.get("id") == wanted)
    finally:
        ws.close()
    found = json.loads(result["result"]["result"]["value"])
    report.title, report.text = found["title"], found["text"]
    report.images, report.tables = found["images"], found["tables"]
    return report
