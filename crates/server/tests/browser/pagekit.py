"""What the page's browser tests share: `sdserve serve` on a free port, a recorded page, helpers.

The fixtures that start them are in conftest.py; see test_page.py for how the suite runs.
"""

import base64
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
BIN = os.environ.get("SDSERVE_BIN", str(ROOT / "target/debug/sdserve"))
TINY = ROOT / "crates/pipeline/tests/fixtures/tiny-b"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("SCREENSHOTS")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Chromium must not try the network on its own (this machine has none; the page must not need it).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", "LOG_LEVEL": "warn", **(env or {})}
        self.proc = subprocess.Popen([BIN, "serve", *args], env=full_env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("sdserve did not become ready")

    def post_json(self, path, body, key=None):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def get_json(self, path, key=None):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Page:
    """A page with every request and console message recorded."""

    def __init__(self, browser, server, viewport):
        self.context = browser.new_context(viewport=viewport)
        self.page = self.context.new_page()
        self.requests = []
        self.console_errors = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.server = server
        self.page.goto(server.url + "/")

    def foreign_requests(self):
        return [u for u in self.requests if not (u.startswith(self.server.url + "/") or u.startswith("data:") or u.startswith("blob:"))]

    def close(self):
        self.context.close()


def shot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def fill_request(page, prompt, steps, size, seed):
    page.get_by_role("textbox", name="Prompt", exact=True).fill(prompt)
    # Exact names: "Hires steps", "Hires width", ... are other fields.
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Width", exact=True).fill(str(size))
    page.get_by_label("Height", exact=True).fill(str(size))
    page.get_by_label("Seed", exact=True).fill(str(seed))


def shown_png(image):
    """The PNG bytes an <img> shows (a data: URL)."""
    return base64.b64decode(image.get_attribute("src").split(",", 1)[1])
