"""End to end: `captioner serve` in a subprocess, the page driven in headless Chromium by Playwright."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from captioner.io import atomic_write_bytes

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run",
                 # a fake camera that grants itself, so the capture path runs too
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
REPO = Path(__file__).resolve().parents[1]
PHOTO = "1000268201_693b08cb0e.jpg"

# Spies on speechSynthesis (headless Chromium has no voices) so the test can see what was spoken.
SPEECH_SPY = """
window.__spoken = [];
if (window.speechSynthesis) {
  const speak = speechSynthesis.speak.bind(speechSynthesis);
  speechSynthesis.speak = (u) => { window.__spoken.push(u.text); try { speak(u); } catch (e) {} };
}
"""

# Every form control must have an accessible name: a <label>, aria-label(ledby) or its own text.
UNNAMED_CONTROLS = """() => [...document.querySelectorAll('button, input, select, textarea, video')]
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
  .map((el) => el.id || el.outerHTML.slice(0, 60))"""

# WCAG contrast ratio of an element's text against the first opaque background behind it.
CONTRAST = """(sel) => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => { const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
                               return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const el = document.querySelector(sel);
  let bg = null;
  for (let n = el; n && !bg; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.length < 4 || c[3] === 1) bg = c.slice(0, 3);
  }
  const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(bg || [255, 255, 255])];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def wait_until(page, expression: str, timeout: float = 30) -> None:
    """Poll a JS expression (page.wait_for_function evaluates strings, which the page's CSP forbids)."""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < deadline, f"timed out waiting for: {expression}"
        time.sleep(0.1)


def watch_errors(page) -> list[str]:
    """Console errors and uncaught exceptions (a CSP violation shows up here too)."""
    errors = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM}: chromium missing (required when CI is set)")
        pytest.skip(f"{CHROMIUM}: chromium missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    exe = Path(sys.executable).with_name("captioner")
    command = [str(exe)] if exe.is_file() else [shutil.which("captioner") or "captioner"]
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*command, "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", str(model_path)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"captioner serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"captioner serve did not answer within 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_upload_caption_attention_and_accessibility(chromium, server, flickr8k_root, tmp_path):
    photo = flickr8k_root / "images" / PHOTO
    expected = httpx.post(f"{server}/api/caption", files={"file": (PHOTO, photo.read_bytes(), "image/jpeg")},
                          timeout=60).json()["caption"]
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(SPEECH_SPY)
    errors = watch_errors(page)
    page.goto(server)
    assert page.get_attribute("#caption", "aria-live") == "polite"
    assert page.get_attribute("#error", "role") == "alert"
    assert page.evaluate(UNNAMED_CONTROLS) == []

    # keyboard: every main control is reachable with Tab
    reached = set()
    for _ in range(15):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {"file", "camera-start", "beam", "speak"} <= reached

    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#caption .word", timeout=60_000)
    assert page.inner_text("#caption").strip() == expected
    assert page.evaluate("window.__spoken") == [expected]
    assert page.get_attribute("#photo", "alt") == expected

    # focusing a word draws its attention map over the photo
    page.focus("#caption .word >> nth=1")
    assert page.get_attribute("#overlay", "data-word") == "1"
    alpha = page.evaluate("""() => { const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0; for (let i = 3; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return [c.width, lo, hi]; }""")
    assert alpha[0] > 0 and alpha[2] > alpha[1]  # translucent where attended, darker elsewhere
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # visible focus

    # the screenshot shows a word with its attention map, for the README
    shot = tmp_path / "page.png"
    png = page.screenshot(full_page=True)
    shot.write_bytes(png)
    atomic_write_bytes(REPO / "docs" / "screenshot.png", png)
    print(f"screenshot: {shot}")

    page.click("#repeat")
    assert page.evaluate("window.__spoken") == [expected, expected]
    for sel in ("h1", ".lede", "#caption .word", "#repeat", "#score", "label[for=file]"):
        assert page.evaluate(CONTRAST, sel) >= 4.5, sel

    # a bad file shows a readable error in the alert region
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    wait_until(page, "document.getElementById('error').textContent.includes('notes.txt')")
    assert page.inner_text("#caption") == ""
    # the only console error allowed is the browser's note about that 422 response
    assert [e for e in errors if "422" not in e] == []
    page.close()


def test_phone_layout_speech_toggle_and_camera(chromium, server, tmp_path):
    page = chromium.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.add_init_script(SPEECH_SPY)
    errors = watch_errors(page)
    page.goto(server)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    page.uncheck("#speak")
    page.reload()
    assert not page.is_checked("#speak")  # remembered in localStorage

    page.click("#camera-start")
    page.wait_for_selector("#camera-capture:not([hidden])", timeout=15_000)
    wait_until(page, "document.getElementById('camera').videoWidth > 0", 15)
    page.click("#camera-capture")
    page.wait_for_selector("#caption .word", timeout=60_000)
    assert page.inner_text("#caption").strip()
    assert page.evaluate("window.__spoken") == []  # speech is off
    page.click("#camera-stop")
    assert page.is_hidden("#camera")
    shot = tmp_path / "phone.png"
    shot.write_bytes(page.screenshot(full_page=True))
    print(f"phone screenshot: {shot}")
    assert errors == []
    page.close()
