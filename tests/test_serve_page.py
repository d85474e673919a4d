"""`sigec serve` as a command: it serves, its painting page works in a real browser, SIGINT stops it.

The server is a subprocess (`python -m sigec.cli serve ENGINE`, its own local Ray instance, small
SPADE engine, 1 replica). The page test drives Debian's headless Chromium through Playwright
(tools/dev.sh installs both): it paints a stroke, checks that the generated image changed where
painted and that the sparse and dense times are shown, and stores a screenshot (in the test's tmp
folder, and a copy in out/serve/ for humans). It skips, saying why, only without a browser.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the serve extra is not installed (pip install 'sigec[serve]')")

import sigec  # noqa: E402
from helpers import free_port, small_spade_engine  # noqa: E402
from sigec.apps import zoo  # noqa: E402
from sigec.apps.serve import Client  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`sigec serve` on a free port of 127.0.0.1, ready; stopped at the end (the last test stops it itself)."""
    folder = tmp_path_factory.mktemp("serve_page")
    engine = small_spade_engine(tmp_path_factory)
    port = free_port()
    log = folder / "serve.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "sigec.cli", "serve", str(engine), "--port", str(port),
                                    "--replicas", "1", "--threads", "1", "--max-cache-mib", "64"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder)
    server = Server(process, f"http://127.0.0.1:{port}", port, log)
    try:
        with Client(server.url) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not client.healthy():
                assert process.poll() is None, f"sigec serve exited early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"sigec serve not ready in {START_TIMEOUT_S} s"
                time.sleep(0.3)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_sigec_serve_serves_sessions(server):
    with Client(server.url) as client:
        info = client.info()
        assert info["replicas"] == 1 and info["inputs"][0]["shape"] == [1, 35, 64, 128]
        _, inputs = zoo.build("spade", small=True)
        session = client.open()
        primed = client.prime(session, {"label": inputs["label"].numpy()})
        assert primed[0].shape == (1, 3, 64, 128) and client.last.path == "full"
        client.close(session)


def _browser_or_skip() -> str:
    """The Chromium executable, or skip with the reason."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (tools/dev.sh installs it for the tests)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no Chromium here: tools/dev.sh installs Debian's chromium when apt-get can run")
    return executable


def _output_pixels(page) -> np.ndarray:
    """The generated image shown by the page, [H, W, 3] uint8."""
    width, height, data = page.evaluate("""() => {
        const c = document.getElementById('output');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""")
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def test_painting_page_rerenders_a_stroke_incrementally(server, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            page.wait_for_function("() => document.getElementById('status').textContent.startsWith('ready')",
                                   timeout=60_000)
            height, width = page.evaluate("() => [window.sigecPage.height, window.sigecPage.width]")
            before = _output_pixels(page)

            # A horizontal stroke (label pixels y = 32, x = 40..72, brush radius 3) of a class absent there.
            y, x0, x1, radius = 32, 40, 72, 3
            present = set(page.evaluate(f"() => Array.from(window.sigecPage.labels.slice({y * width + x0}, "
                                        f"{y * width + x1 + 1}))"))
            new_class = next(k for k in (23, 26, 21, 11, 7) if k not in present)
            page.click(f"#palette button[data-class='{new_class}']")
            page.fill("#brush", str(radius))
            box = page.locator("#labels").bounding_box()
            to_screen = lambda px, py: (box["x"] + (px + 0.5) * box["width"] / width,  # noqa: E731
                                        box["y"] + (py + 0.5) * box["height"] / height)
            page.mouse.move(*to_screen(x0, y))
            page.mouse.down()
            for x in range(x0, x1 + 1, 2):
                page.mouse.move(*to_screen(x, y))
            page.mouse.up()
            page.wait_for_function("() => /dense [0-9.]+ ms,/.test(document.getElementById('timing').textContent)",
                                   timeout=60_000)
            timing = page.text_content("#timing")
            after = _output_pixels(page)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()

    out = ROOT / "out" / "serve"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "page.png", out / "page.png")
    assert re.match(r"stroke 1: sparse [0-9.]+ ms \(sparse\), dense [0-9.]+ ms, [0-9.]+x faster", timing), timing
    changed = np.abs(after.astype(int) - before.astype(int)).max(axis=-1) > 0
    painted = np.zeros((height, width), dtype=bool)
    painted[y - radius:y + radius + 1, x0 - radius:x1 + radius + 1] = True
    assert changed[painted].mean() > 0.5, f"only {changed[painted].mean():.0%} of the painted pixels changed"


def test_sigint_stops_sigec_serve_cleanly(server):
    server.process.send_signal(signal.SIGINT)
    code = server.process.wait(STOP_TIMEOUT_S)
    log = server.log.read_text()
    assert code == 0, log[-3000:]
    assert "sigec serve: stopped" in log, log[-3000:]
    with socket.socket() as s:  # nothing listens on the port any more
        assert s.connect_ex(("127.0.0.1", server.port)) != 0
