"""Fixtures of the page's browser tests (helpers in pagekit.py)."""

import pytest
from playwright.sync_api import sync_playwright

from pagekit import CHROMIUM, CHROMIUM_ARGS, TINY, Server


@pytest.fixture(scope="module")
def tiny():
    s = Server("--model", str(TINY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow():
    # 300 ms a step: a 30-step run lasts 9 s, long enough to see progress and cancel it.
    s = Server("--fake-generator", "step_ms=300")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
