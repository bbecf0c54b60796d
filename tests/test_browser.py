"""End to end: `captioner serve` in a subprocess, the page driven in headless Chromium by Playwright.

What a person who cannot see the page gets is measured from outside: every change to a live region
(MutationObserver) and every speechSynthesis.speak call are recorded by init scripts, the tab order is
walked with the keyboard, and axe-core (npm, pinned in the Makefile) audits WCAG 2.2 A/AA.
"""
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
AXE_JS = REPO / "build" / "axe-core" / "node_modules" / "axe-core" / "axe.min.js"  # `make axe`
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
PHOTO = "1000268201_693b08cb0e.jpg"
LIBRARY_PHOTOS = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]

# Spies on speechSynthesis (headless Chromium has no voices) so the test can see what was spoken.
SPEECH_SPY = """
window.__spoken = [];
if (window.speechSynthesis) {
  const speak = speechSynthesis.speak.bind(speechSynthesis);
  speechSynthesis.speak = (u) => { window.__spoken.push(u.text); try { speak(u); } catch (e) {} };
}
"""

# Records every change inside a live region, as a screen reader is told of it: the region's text when the
# change is delivered, and whether the region then sat inside an aria-busy container (which AT may ignore).
LIVE_SPY = """
window.__live = [];
const LIVE = '[aria-live]:not([aria-live="off"]), [role=status], [role=alert], [role=log]';
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    const region = el && el.closest(LIVE);
    if (region) window.__live.push({ id: region.id, text: region.textContent.trim(),
                                     busy: !!region.closest('[aria-busy=true]') });
  }
}).observe(document, { childList: true, subtree: true, characterData: true });
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

# Images on screen that the browser could not decode (shown as a broken-image icon).
BROKEN_IMAGES = """() => [...document.images]
  .filter((img) => img.getClientRects().length && img.getAttribute('src') && img.complete && !img.naturalWidth)
  .map((img) => img.alt || img.src)"""

# Visible elements whose box overlaps the element's own box, other than its ancestors and descendants.
COVERED_BY = """(sel) => {
  const me = document.querySelector(sel), a = me.getBoundingClientRect();
  return [...document.body.querySelectorAll('*')].filter((el) => {
    if (el === me || el.contains(me) || me.contains(el)) return false;
    const b = el.getBoundingClientRect();
    return b.width && b.height && a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  }).map((el) => el.id || el.tagName);
}"""

AXE_RUN = """async (tags) => {
  const r = await axe.run(document, { runOnly: { type: 'tag', values: tags } });
  return { passed: r.passes.length, violations: r.violations.map((v) =>
    `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target.join(' ')).join(', ')}`) };
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


def captioner_command() -> list[str]:
    exe = Path(sys.executable).with_name("captioner")
    return [str(exe)] if exe.is_file() else [shutil.which("captioner") or "captioner"]


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
def axe_js() -> Path:
    if not AXE_JS.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{AXE_JS}: axe-core missing (required when CI is set; `make axe` installs it)")
        pytest.skip(f"{AXE_JS}: axe-core missing (`make axe` installs it with npm)")
    return AXE_JS


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path, flickr8k_root):
    """The server with a library of three Flickr8k photos and a video of three scenes (H.264, as browsers
    play), so the page has its search box."""
    from test_video import PHOTOS, SECONDS, make_clip
    folder = tmp_path_factory.mktemp("library")
    for name in LIBRARY_PHOTOS:
        shutil.copy(flickr8k_root / "images" / name, folder / name)
    make_clip(folder / "clip.mp4", [REPO / "examples" / name for name in PHOTOS], SECONDS, codec="libx264")
    db = folder / "library.sqlite"
    subprocess.run([*captioner_command(), "index", str(folder), "--db", str(db), "--model", str(model_path),
                    "--no-progress"], check=True, capture_output=True, timeout=300)
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*captioner_command(), "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--model", str(model_path), "--db", str(db)],
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


@pytest.fixture(scope="module")
def photo(flickr8k_root) -> Path:
    return flickr8k_root / "images" / PHOTO


@pytest.fixture(scope="module")
def expected(server, photo) -> dict:
    """The server's answer for PHOTO with the page's own options, and the sentence a person should be told."""
    body = httpx.post(f"{server}/api/caption", params={"beam": 3, "n_best": 3, "attention": "true"},
                      files={"file": (PHOTO, photo.read_bytes(), "image/jpeg")}, timeout=60).json()
    return {**body, "said": body.get("text") or body["caption"]}


def open_page(chromium, server, **options):
    page = chromium.new_page(**{"viewport": {"width": 1280, "height": 900}, **options})
    page.add_init_script(SPEECH_SPY)
    page.add_init_script(LIVE_SPY)
    errors = watch_errors(page)
    page.goto(server)
    return page, errors


def said(page, text: str) -> list[dict]:
    """The live-region changes a screen reader would read out that contain `text`."""
    return [e for e in page.evaluate("window.__live") if text in e["text"]]


def result_name(hit: dict) -> str:
    """What a search result's link is named: the caption, and for a video scene its times (app.js clock)."""
    clock = lambda s: f"{int(s // 60)}:{s % 60:04.1f}"  # noqa: E731
    return hit["caption"] + (f" (video, {clock(hit['start'])} to {clock(hit['end'])})" if "start" in hit else "")


def found(hits: list[dict]) -> str:
    """The search status: how many photos and video scenes were found."""
    scenes = sum("start" in h for h in hits)
    photos, plural = len(hits) - scenes, lambda n, word: f"{n} {word}{'s' if n != 1 else ''}"  # noqa: E731
    return " and ".join(([plural(photos, "photo")] if photos or not scenes else [])
                        + ([plural(scenes, "video scene")] if scenes else [])) + " found"


def caption_photo(page, photo: Path, text: str) -> None:
    """Choose the photo and wait until its caption has been announced, plus a moment for any echo."""
    before = len(said(page, text))
    page.set_input_files("#file", str(photo))
    wait_until(page, f"window.__live.filter((e) => e.text.includes({text!r})).length > {before}", 60)
    page.wait_for_timeout(600)


def test_one_announcement_per_caption_speech_by_choice_and_repeat(chromium, server, photo, expected):
    text = expected["said"]
    page, errors = open_page(chromium, server)
    assert not page.is_checked("#speak")  # the page's own voice is opt-in: screen readers already speak

    # the server is slowed down once so that the progress message has time to be announced
    page.route("**/api/caption*", lambda route: (time.sleep(1), route.continue_()))
    caption_photo(page, photo, text)
    page.unroute("**/api/caption*")
    announced = said(page, text)
    assert [e["text"] for e in announced] == [text]  # once, as one sentence, in one region
    region = announced[0]["id"]
    assert page.get_attribute(f"#{region}", "role") == "status"
    assert page.get_attribute(f"#{region}", "aria-atomic") == "true"
    box = page.locator(f"#{region}").bounding_box()
    assert box is None or box["width"] <= 1 and box["height"] <= 1  # visually hidden
    assert page.evaluate("window.__spoken") == []
    assert page.inner_text("#caption").strip() == text  # and shown
    # progress was announced, and nothing was announced from inside an aria-busy container
    live = page.evaluate("window.__live")
    assert any("Writing a caption" in e["text"] for e in live)
    assert [e for e in live if e["busy"]] == []

    # the same photo again: one more announcement, not one per word
    caption_photo(page, photo, text)
    assert len(said(page, text)) == 2

    # Repeat re-announces even with the page's voice off (emptied, then filled: heard although unchanged)
    page.click("#repeat")
    wait_until(page, f"window.__live.filter((e) => e.text.includes({text!r})).length === 3", 5)
    assert page.evaluate("window.__spoken") == []

    # the page's voice is a remembered choice; with it on, each caption is spoken once and Repeat speaks again
    page.check("#speak")
    page.reload()
    assert page.is_checked("#speak")
    caption_photo(page, photo, text)
    assert len(said(page, text)) == 1
    assert page.evaluate("window.__spoken") == [text]
    page.click("#repeat")
    wait_until(page, f"window.__live.filter((e) => e.text.includes({text!r})).length === 2", 5)
    assert page.evaluate("window.__spoken") == [text, text]
    assert errors == []
    page.close()


def test_keyboard_words_attention_and_failed_upload(chromium, server, photo, expected, tmp_path):
    text, tokens = expected["said"], expected["tokens"]
    page, errors = open_page(chromium, server)
    assert page.evaluate(UNNAMED_CONTROLS) == []
    caption_photo(page, photo, text)
    assert page.evaluate(UNNAMED_CONTROLS) == []

    # Tab from "Choose a photo" reaches Repeat within 6 stops; all the words together are one stop
    page.focus("#file")
    stops = []
    while page.evaluate("document.activeElement.id") != "repeat" and len(stops) < 20:
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.classList.contains('word') ? 'word'"
                                   " : document.activeElement.id"))
    assert stops[-1] == "repeat" and len(stops) <= 6, stops
    assert stops.count("word") == 1
    assert {"camera-start", "beam", "speak"} <= set(stops)

    # the words: a labelled, described toolbar; arrow keys move between them, each shows its attention map
    page.keyboard.press("Shift+Tab")
    bar = page.locator("#caption [role=toolbar]")
    assert bar.get_attribute("aria-label")
    hint = page.get_attribute("#caption [role=toolbar]", "aria-describedby")
    assert page.is_visible(f"#{hint}") and "arrow keys" in page.inner_text(f"#{hint}")
    assert page.locator("#caption .word").count() == len(tokens)
    assert page.evaluate("document.activeElement.dataset.index") == "0"
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    assert page.evaluate("[...document.querySelectorAll('#caption .word')].map((w) => w.tabIndex)") == \
        [-1, 0] + [-1] * (len(tokens) - 2)  # roving tabindex: one Tab stop, the word last visited
    assert page.get_attribute("#overlay", "data-word") == "1"
    alpha = page.evaluate("""() => { const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0; for (let i = 3; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return [c.width, lo, hi]; }""")
    assert alpha[0] > 0 and alpha[2] > alpha[1]  # translucent where attended, darker elsewhere
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"  # visible focus
    page.keyboard.press("End")
    assert page.evaluate("document.activeElement.dataset.index") == str(len(tokens) - 1)
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    # Enter keeps the word's map shown after focus moves on
    page.keyboard.press("Enter")
    assert page.get_attribute("#caption .word >> nth=1", "aria-pressed") == "true"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "repeat"
    assert page.get_attribute("#overlay", "data-word") == "1"

    # the screenshot shows a word with its attention map, for the README
    shot = tmp_path / "page.png"
    png = page.screenshot(full_page=True)
    shot.write_bytes(png)
    atomic_write_bytes(REPO / "docs" / "screenshot.png", png)
    print(f"screenshot: {shot}")
    for sel in ("h1", ".lede", "#caption .word", "#repeat", "#score", "label[for=file]"):
        assert page.evaluate(CONTRAST, sel) >= 4.5, sel

    # a file that is no image: a readable alert, outside aria-busy, and no broken (or stale) photo left
    page.set_input_files("#file", files=[{"name": "fake.jpg", "mimeType": "image/jpeg", "buffer": b"hello"}])
    wait_until(page, "document.getElementById('error').textContent.includes('fake.jpg')")
    assert page.evaluate("!!document.getElementById('error').closest('[aria-busy=true]')") is False
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.is_hidden("#stage")
    assert page.inner_text("#caption") == ""
    assert [e for e in page.evaluate("window.__live") if e["id"] == "error" and "fake.jpg" in e["text"]]
    # the only console error allowed is the browser's note about that 422 response
    assert [e for e in errors if "422" not in e] == []
    page.close()


def test_search_results_named_once(chromium, server, expected):
    page, errors = open_page(chromium, server)
    page.wait_for_selector("#search-section:not([hidden])")
    query = expected["caption"]  # any of its words: finds that photo of the library and likely the others
    hits = httpx.get(f"{server}/api/search", params={"q": query, "limit": 24}).json()["results"]
    assert hits
    page.fill("#q", query)
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-results li")
    tree = page.locator("#search-results").aria_snapshot()
    for hit in hits:
        # reachable (a link to the photo or video) and named by its caption exactly once: not also by alt or a figure
        assert page.get_by_role("link", name=result_name(hit), exact=True).count() >= 1
        assert tree.count(hit["caption"]) == sum(h["caption"] == hit["caption"] for h in hits), tree
    assert page.inner_text("#search-status") == found(hits)
    assert errors == []
    page.close()


def test_search_finds_a_video_scene_and_plays_it_from_its_start(chromium, server, axe_js):
    page, errors = open_page(chromium, server)
    page.add_init_script(path=str(axe_js))
    page.reload()
    page.wait_for_selector("#search-section:not([hidden])")
    scenes = [h for h in httpx.get(f"{server}/api/search", params={"q": "man people cat game", "limit": 50})
              .json()["results"] if h.get("start")]  # a scene after the first: its start is not 0
    assert scenes, "no video scene found"
    hit = scenes[0]
    page.fill("#q", hit["caption"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-results li")
    assert page.inner_text("#search-status") == found(httpx.get(
        f"{server}/api/search", params={"q": hit["caption"], "limit": 24}).json()["results"])
    link = page.get_by_role("link", name=result_name(hit), exact=True).first
    href = link.get_attribute("href")
    assert href.endswith(f"#t={hit['start']:g},{hit['end']:g}"), href  # a media fragment: the scene's times
    # the preview (hidden from screen readers: the link's name says it) shows the scene's start
    preview = f"document.querySelector('#search-results a[href=\"{href}\"] video')"
    wait_until(page, f"{preview}.readyState >= 1", 30)
    assert abs(page.evaluate(f"{preview}.currentTime") - hit["start"]) < 0.2
    assert page.evaluate(f"{preview}.getAttribute('aria-hidden')") == "true"
    report = page.evaluate(AXE_RUN, AXE_TAGS)
    assert report["passed"] > 0 and report["violations"] == [], report["violations"]
    assert errors == []
    # following the link plays the video from the scene's start
    link.click()
    wait_until(page, "document.querySelector('video') && document.querySelector('video').readyState >= 1", 30)
    assert hit["start"] - 0.1 <= page.evaluate("document.querySelector('video').currentTime") <= hit["end"] + 0.1
    page.close()


def test_axe_wcag22_dark_mode_skip_link_and_reflow(chromium, server, photo, expected, axe_js):
    def audit(page, state):
        report = page.evaluate(AXE_RUN, AXE_TAGS)
        assert report["passed"] > 0, state  # the rules really ran
        assert report["violations"] == [], state

    def open_audited(**options):
        page, errors = open_page(chromium, server, **options)
        page.add_init_script(path=str(axe_js))  # an init script, as the page's CSP refuses injected <script>s
        page.reload()
        return page, errors

    def search(page):
        page.fill("#q", expected["caption"])
        page.keyboard.press("Enter")
        page.wait_for_selector("#search-results li")

    text = expected["said"]
    page, errors = open_audited()
    audit(page, "initial")
    # the skip link, when shown, covers nothing
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    assert page.evaluate(COVERED_BY, ".skip") == []
    audit(page, "skip link shown")
    caption_photo(page, photo, text)
    audit(page, "after a caption")
    search(page)
    audit(page, "with search results")

    # dark mode: a dark palette, and still no violation (contrast included)
    page.emulate_media(color_scheme="dark")
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(map(int, background[background.index("(") + 1:-1].split(",")[:3])) < 3 * 64, background
    audit(page, "dark, with a caption and search results")
    assert errors == []
    page.close()

    # 200% zoom of a 1280x900 window (half the CSS pixels, twice the device pixels), and 320 CSS px wide
    for state, options in (("200% zoom", {"viewport": {"width": 640, "height": 450}, "device_scale_factor": 2}),
                           ("320 px wide", {"viewport": {"width": 320, "height": 640}})):
        page, errors = open_audited(**options)
        caption_photo(page, photo, text)
        search(page)
        width = options["viewport"]["width"]
        assert page.evaluate("document.documentElement.scrollWidth") <= width, state  # no sideways scrolling
        audit(page, state)
        assert errors == []
        page.close()


def test_phone_layout_speech_toggle_and_camera(chromium, server, tmp_path):
    page, errors = open_page(chromium, server, viewport={"width": 390, "height": 844}, is_mobile=True,
                             has_touch=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    page.check("#speak")
    page.uncheck("#speak")
    page.reload()
    assert not page.is_checked("#speak")  # remembered in localStorage

    page.click("#camera-start")
    page.wait_for_selector("#camera-capture:not([hidden])", timeout=15_000)
    wait_until(page, "document.getElementById('camera').videoWidth > 0", 15)
    page.click("#camera-capture")
    wait_until(page, "document.getElementById('repeat').disabled === false", 60)
    caption = page.inner_text("#caption").strip()
    assert caption
    wait_until(page, f"window.__live.some((e) => e.text === {caption!r})", 5)
    assert page.evaluate("window.__spoken") == []  # speech is off
    page.click("#camera-stop")
    assert page.is_hidden("#camera")
    shot = tmp_path / "phone.png"
    shot.write_bytes(page.screenshot(full_page=True))
    print(f"phone screenshot: {shot}")
    assert errors == []
    page.close()


# Records what live mode sends and receives, and the camera streams it opens (to see them released).
LIVE_MODE_SPY = """
window.__answers = []; window.__sockets = []; window.__streams = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
    this.addEventListener('message', (e) => window.__answers.push(JSON.parse(e.data)));
  }
};
if (navigator.mediaDevices) {
  const getUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => {
    const s = await getUserMedia(c);
    window.__streams.push(s);
    return s;
  };
}
"""
LIVE_PHOTOS = ["camera.jpg", "cat.jpg", "astronaut.jpg"]  # examples/ photos the model describes differently
SCENE_S, CLIP_FPS = 4, 5


def write_y4m(path: Path, photos: list[Path], seconds: float, fps: int, size=(320, 240)) -> None:
    """A Y4M clip (what Chromium's fake camera plays, in a loop): each photo held still for `seconds`."""
    import numpy as np
    from PIL import Image
    w, h = size
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for photo in photos:
            y, cb, cr = Image.open(photo).convert("RGB").resize(size).convert("YCbCr").split()
            planes = [np.asarray(y), np.asarray(cb.resize((w // 2, h // 2))), np.asarray(cr.resize((w // 2, h // 2)))]
            frame = b"FRAME\n" + b"".join(p.tobytes() for p in planes)
            f.write(frame * int(seconds * fps))


def test_live_mode_describes_each_scene_once_pauses_and_releases_camera(chromium, server, tmp_path):
    clip = tmp_path / "clip.y4m"
    write_y4m(clip, [REPO / "examples" / name for name in LIVE_PHOTOS], SCENE_S, CLIP_FPS)
    browser = chromium.browser_type.launch(executable_path=CHROMIUM,
                                           args=[*CHROMIUM_ARGS, f"--use-file-for-fake-video-capture={clip}"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    for script in (SPEECH_SPY, LIVE_SPY, LIVE_MODE_SPY):
        page.add_init_script(script)
    if AXE_JS.is_file():
        page.add_init_script(path=str(AXE_JS))
    errors = watch_errors(page)
    page.goto(server)
    page.check("#speak")

    # keyboard only: Tab reaches "Describe live", Enter starts it
    page.focus("#camera-start")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "live-start"
    started = time.time()
    page.keyboard.press("Enter")
    page.wait_for_selector("#live-indicator:not([hidden])", timeout=15_000)
    assert "Live" in page.inner_text("#live-indicator") and "Esc" in page.inner_text("#live-indicator")
    # every scene of the clip is described and said
    wait_until(page, f"new Set(window.__spoken).size >= {len(LIVE_PHOTOS)}", 120)
    page.wait_for_timeout(2000)
    elapsed = time.time() - started
    spoken = page.evaluate("window.__spoken")
    answers = [a for a in page.evaluate("window.__answers") if "text" in a]
    print(f"live: {len(answers)} frames described in {elapsed:.0f} s; said {spoken}")
    # one frame in flight: the server never had to drop a frame of this page's, and answered them in order
    frames = [a["frame"] for a in answers]
    assert all(a["dropped"] == 0 for a in answers) and frames == sorted(frames), answers
    assert all(a != b for a, b in zip(spoken, spoken[1:])), spoken  # never the same sentence twice in a row
    assert set(spoken) <= {a["text"] for a in answers}  # what was said is what the server described
    # said once per scene change, not for every frame: at most one sentence per scene the clip has shown
    assert len(spoken) <= elapsed / SCENE_S + 1, (spoken, elapsed)
    assert len(answers) >= 2 * len(spoken), (len(answers), spoken)
    # the screen follows the scene; the live region says what the voice says, once each
    assert page.inner_text("#caption").strip() in {a["text"] for a in answers[-3:]}
    heard = [e["text"] for e in page.evaluate("window.__live") if e["id"] == "announce" and e["text"] in spoken]
    assert heard == spoken
    assert [e for e in page.evaluate("window.__live") if e["busy"]] == []
    if AXE_JS.is_file():
        report = page.evaluate(AXE_RUN, AXE_TAGS)
        assert report["passed"] > 0 and report["violations"] == [], report["violations"]

    # Esc pauses (no more frames go out, beyond the one in flight) and resumes
    page.keyboard.press("Escape")
    assert "paused" in page.inner_text("#live-indicator")
    assert page.inner_text("#live-pause") == "Resume"
    page.wait_for_timeout(1000)
    count = page.evaluate("window.__answers.length")
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__answers.length") == count
    page.keyboard.press("Escape")
    wait_until(page, f"window.__answers.length > {count}", 30)

    # Stop: the socket closes, the camera is released, focus returns to the control that starts it again
    page.click("#live-stop")
    wait_until(page, "window.__sockets.every((s) => s.readyState === WebSocket.CLOSED)", 10)
    assert page.evaluate("window.__streams.length") >= 1
    assert page.evaluate("window.__streams.every((s) => s.getTracks().every((t) => t.readyState === 'ended'))")
    assert page.is_hidden("#camera") and page.is_hidden("#live-indicator")
    assert page.evaluate("document.activeElement.id") == "live-start"
    assert errors == []
    browser.close()


def test_video_upload_lists_each_scene_once(chromium, server, photo, expected, tmp_path):
    from test_video import PHOTOS, SECONDS, make_clip
    clip = make_clip(tmp_path / "holiday.mp4", [REPO / "examples" / name for name in PHOTOS], SECONDS)
    page, errors = open_page(chromium, server)
    if AXE_JS.is_file():
        page.add_init_script(path=str(AXE_JS))
        page.reload()
    page.set_input_files("#file", str(clip))
    wait_until(page, "document.querySelectorAll('#scenes li').length > 0", 120)
    scenes = page.locator("#scenes li").all_inner_texts()
    assert len(scenes) == len(PHOTOS) and scenes[0].startswith("0:00.0 to 0:02.5: "), scenes
    summary = f"holiday.mp4: {len(PHOTOS)} scenes described."
    assert page.inner_text("#caption").strip() == summary
    page.wait_for_timeout(600)
    assert [e["text"] for e in said(page, summary)] == [f"{summary} Play the video to hear each scene as it starts."]
    assert page.get_attribute("#clip track", "kind") == "descriptions"
    assert page.get_attribute("#vtt-link", "href").startswith("blob:")
    assert page.evaluate(UNNAMED_CONTROLS) == []
    if AXE_JS.is_file():
        report = page.evaluate(AXE_RUN, AXE_TAGS)
        assert report["passed"] > 0 and report["violations"] == [], report["violations"]
    caption_photo(page, photo, expected["said"])  # a photo next: the video and its scenes go away
    assert page.is_hidden("#video-result") and page.locator("#scenes li").count() == 0
    assert errors == []
    page.close()
