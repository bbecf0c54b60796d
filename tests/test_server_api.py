"""The HTTP API for programs: the batch endpoint, CORS origins, the OpenAPI schema and the offline /docs page.
A stand-in captioner (no model weights) captions each image by its width, through the real decoding path."""
import io
import re
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner.apps.api import CaptionResult
from captioner.apps.server import MAX_BATCH_FILES, create_app

LOCAL = "http://127.0.0.1:8000"  # the server checks the Host header
SITE = "https://app.example"


def png(width: int, height: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class StandIn:
    """Captions each (decoded) image "a picture W wide"; records the size of every caption_batch call."""
    info = {"name": "stand-in", "path": "/home/someone/models/stand-in.safetensors", "grid": [9, 9]}

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.calls = gate, []

    def caption_batch(self, images, *, beam_size=None, n_best=1, attention=False):
        if self.gate is not None:
            assert self.gate.wait(30)
        self.calls.append(len(images))
        return [CaptionResult(caption=f"a picture {im.width} wide", score=-1.0, tokens=["a", "picture"])
                for im in images]


@pytest.fixture
def client():
    with TestClient(create_app(StandIn(), max_upload_mb=1), base_url=LOCAL) as c:
        yield c


def files(*items):
    return [("files", item) for item in items]


# --- POST /api/caption/batch -----------------------------------------------------------------------

def test_batch_answers_each_file_in_order_and_names_bad_ones(client):
    r = client.post("/api/caption/batch", files=files(
        ("a.png", png(30), "image/png"), ("notes.txt", b"not a picture", "text/plain"),
        ("empty.jpg", b"", "image/jpeg"), ("b.png", png(50), "image/png")))
    assert r.status_code == 200, r.text
    a, notes, empty, b = r.json()
    assert a["text"] == a["caption"] == "a picture 30 wide" and a["source"] == "a.png" and a["grid"] == [9, 9]
    assert set(a) >= {"text", "caption", "confidence", "concepts", "score", "tokens", "alternatives"}
    assert b["caption"] == "a picture 50 wide" and b["source"] == "b.png"
    assert set(notes) == {"error"} and notes["error"].startswith("notes.txt: ") and "not an image" in notes["error"]
    assert empty == {"error": "empty.jpg: empty upload (0 bytes)"}
    app = client.app
    assert app.state.in_flight.requests == 0 and app.state.in_flight.bytes == 0


def test_batch_file_over_the_upload_limit_is_that_files_error(client):
    big = b"\xff\xd8" + b"\0" * (1024 * 1024 + 10)
    r = client.post("/api/caption/batch", files=files(("big.jpg", big, "image/jpeg"), ("ok.png", png(20), "image/png")))
    big_entry, ok = r.json()
    assert big_entry["error"].startswith("big.jpg: ") and "1,048,576 bytes" in big_entry["error"]
    assert ok["caption"] == "a picture 20 wide"


def test_batch_goes_through_micro_batching():
    stand_in = StandIn()
    # the model thread waits up to 5 s for the batch to fill: the four files arrive well within that
    with TestClient(create_app(stand_in, max_batch=4, batch_wait_ms=5000), base_url=LOCAL) as c:
        r = c.post("/api/caption/batch", files=files(*[(f"{w}.png", png(w), "image/png") for w in (10, 20, 30, 40)]))
    assert [e["caption"] for e in r.json()] == [f"a picture {w} wide" for w in (10, 20, 30, 40)]
    assert stand_in.calls == [4]


@pytest.mark.parametrize("send, status, words", [
    ({"files": files(*[(f"{i}.png", b"x", "image/png") for i in range(MAX_BATCH_FILES + 1)])}, 413,
     f"more than {MAX_BATCH_FILES} files"),
    ({"files": [("file", ("a.png", b"x", "image/png"))]}, 422, "no files"),
    ({"content": png(10), "headers": {"content-type": "image/png"}}, 422, "multipart/form-data"),
])
def test_batch_refusals(client, send, status, words):
    r = client.post("/api/caption/batch", **send)
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_batch_options_are_checked(client):
    r = client.post("/api/caption/batch?beam=2&n_best=3", files=files(("a.png", png(10), "image/png")))
    assert r.status_code == 422 and "n_best (3) cannot exceed beam (2)" in r.json()["detail"]


def test_batch_shares_admission_control_with_single_captions():
    gate = threading.Event()
    app = create_app(StandIn(gate), max_pending=1)
    with TestClient(app, base_url=LOCAL) as c:
        first = []
        t = threading.Thread(target=lambda: first.append(c.post("/api/caption", content=png(10))))
        t.start()
        deadline = time.time() + 10
        while not app.state.in_flight.requests and time.time() < deadline:
            time.sleep(0.01)
        shed = c.post("/api/caption/batch", files=files(("a.png", png(10), "image/png")))
        assert shed.status_code == 503 and shed.headers["retry-after"] == "2", shed.text
        gate.set()
        t.join(30)
        assert first[0].status_code == 200
        assert c.post("/api/caption/batch", files=files(("a.png", png(10), "image/png"))).status_code == 200
        assert app.state.in_flight.requests == 0 and app.state.in_flight.bytes == 0


def test_batch_keeps_the_host_and_origin_rules(client):
    one = files(("a.png", png(10), "image/png"))
    assert client.post("/api/caption/batch", files=one, headers={"host": "evil.example"}).status_code == 421
    r = client.post("/api/caption/batch", files=one, headers={"origin": "http://attacker.example"})
    assert r.status_code == 403 and "cross-origin POST" in r.json()["detail"]


# --- --cors-origin ---------------------------------------------------------------------------------

def test_no_cors_headers_without_cors_origins(client):
    r = client.get("/api/health", headers={"origin": SITE})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    assert client.post("/api/caption", content=png(10), headers={"origin": SITE}).status_code == 403


def test_cors_origins_may_post_and_others_still_may_not():
    with TestClient(create_app(StandIn(), cors_origins=[SITE + "/"]), base_url=LOCAL) as c:
        preflight = c.options("/api/caption", headers={"origin": SITE, "access-control-request-method": "POST",
                                                       "access-control-request-headers": "content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == SITE
        r = c.post("/api/caption", content=png(10), headers={"origin": SITE, "content-type": "image/png"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == SITE
        r = c.post("/api/caption/batch", files=files(("a.png", png(10), "image/png")), headers={"origin": SITE})
        assert r.status_code == 200 and r.json()[0]["caption"] == "a picture 10 wide"
        other = c.post("/api/caption", content=png(10), headers={"origin": "https://other.example"})
        assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
        with c.websocket_connect("ws://127.0.0.1:8000/api/live", headers={"origin": SITE}) as ws:
            ws.send_bytes(png(10))
            assert ws.receive_json()["caption"] == "a picture 10 wide"


@pytest.mark.parametrize("origin", ["example.com", "ftp://example.com", "https://example.com/app"])
def test_bad_cors_origin_is_one_clear_error(origin):
    with pytest.raises(ValueError, match="--cors-origin"):
        create_app(StandIn(), cors_origins=[origin])


def test_cli_bad_cors_origin_fails_in_one_line(capsys):
    from captioner.apps.cli import main
    assert main(["serve", "--cors-origin", "example.com"]) == 2  # before the model loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: serve: --cors-origin 'example.com'") and "\n" not in err


# --- the schema and /docs --------------------------------------------------------------------------

def test_openapi_schema_has_request_and_response_models(client):
    spec = client.get("/api/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"Caption", "ItemError", "Problem", "Video"} <= set(schemas)
    assert {"text", "caption", "confidence", "concepts", "tokens", "grid"} <= set(schemas["Caption"]["properties"])
    single = spec["paths"]["/api/caption"]["post"]
    assert single["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Caption"}
    assert single["responses"]["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "file" in single["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    batch = spec["paths"]["/api/caption/batch"]["post"]
    assert batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]["type"] == "array"
    listed = batch["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["type"] == "array" and "ItemError" in str(listed["items"])


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert "'sha256-" in page.headers["content-security-policy"]  # the one inline script, by hash
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(urls) >= 4  # script, stylesheet, icon, schema
    assert not re.search(r"https?://", page.text)
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, url
        r = client.get(url)
        assert r.status_code == 200 and r.content, url
    assert client.get("/docs/assets/index.html").status_code == 404  # it points at an online demo


def test_model_info_shows_no_host_paths(client):
    info = client.get("/api/model").json()
    assert info["path"] == "stand-in.safetensors"


@pytest.mark.browser
def test_docs_page_renders_in_chromium_without_the_network():
    """Swagger UI starts under the page's CSP, lists the routes and asks nothing of any other host."""
    from pathlib import Path

    import uvicorn
    from test_browser import CHROMIUM, CHROMIUM_ARGS, free_port
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM}: chromium missing")
    from playwright.sync_api import sync_playwright
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(StandIn()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            asked, problems = [], []
            page.on("request", lambda r: asked.append(r.url))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(f"http://127.0.0.1:{port}/docs")
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert "/api/caption" in paths and "/api/caption/batch" in paths
    assert problems == [] and all(u.startswith(f"http://127.0.0.1:{port}/") for u in asked), (problems, asked)
