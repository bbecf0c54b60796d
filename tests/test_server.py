"""The HTTP API, in-process with FastAPI's TestClient, against the real shipped model."""
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bomb
from fastapi.testclient import TestClient
from PIL import Image

from captioner.apps.server import create_app

LOCAL = "http://127.0.0.1:8000"  # the server checks the Host header; TestClient's default "testserver" is no name of it
TRAIN_IMAGES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
                "1003163366_44323f5815.jpg", "1007129816_e794419615.jpg"]


@pytest.fixture(scope="module")
def captioner(model_path):
    from captioner.apps.api import Captioner
    return Captioner.load(model_path)


@pytest.fixture(scope="module")
def photos(flickr8k_root) -> list[Path]:
    paths = [flickr8k_root / "images" / name for name in TRAIN_IMAGES]
    assert all(p.is_file() for p in paths), "expected Flickr8k train images are missing"
    return paths


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner, max_upload_mb=1), base_url=LOCAL) as c:
        yield c


def png_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


# ---- good uploads --------------------------------------------------------------------------------

def test_multipart_jpeg_matches_python_api(client, captioner, photos):
    data = photos[0].read_bytes()
    r = client.post("/api/caption", files={"file": (photos[0].name, data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = captioner.caption(data)
    assert body["caption"] == expected.caption and body["caption"]
    assert body["tokens"] == expected.tokens and body["caption"] == " ".join(body["tokens"])
    assert body["score"] == pytest.approx(expected.score, abs=1e-3)
    assert body["alternatives"][0]["caption"] == body["caption"]
    assert body["grid"] == list(captioner.info["grid"])
    assert "attention" not in body and body["ms"] > 0


def test_png_and_raw_body(client, captioner, photos):
    png = png_bytes(photos[1])
    r = client.post("/api/caption", files={"file": ("x.png", png, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == captioner.caption(png).caption
    raw = client.post("/api/caption", content=photos[1].read_bytes(), headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["caption"] == captioner.caption(photos[1].read_bytes()).caption


def test_attention_and_alternatives(client, photos):
    r = client.post("/api/caption?beam=4&n_best=3&attention=true",
                    files={"file": ("a.jpg", photos[2].read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    gh, gw = body["grid"]
    att = np.array(body["attention"])
    assert att.shape == (len(body["tokens"]), gh, gw)
    # soft attention: each word's weights over the grid are a distribution
    np.testing.assert_allclose(att.reshape(len(att), -1).sum(1), 1.0, atol=1e-2)
    scores = [a["score"] for a in body["alternatives"]]
    assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    assert len({a["caption"] for a in body["alternatives"]}) == len(scores)


# ---- bad uploads: clear one-line messages, right status codes ----------------------------------------

@pytest.mark.parametrize("kind, status, words", [
    ("empty", 422, "empty"),
    ("text", 422, ""),
    ("truncated", 422, ""),
    ("bomb", 422, ""),
    ("missing_field", 422, "'file'"),
    ("too_large", 413, "limit"),
    ("too_large_streamed", 413, "limit"),
    ("beam_out_of_range", 422, "beam"),
    ("n_best_over_beam", 422, "n_best"),
])
def test_bad_uploads(client, photos, kind, status, words):
    jpeg = photos[0].read_bytes()
    post = lambda **kw: client.post("/api/caption", **kw)  # noqa: E731
    big = os.urandom(1024 * 1024 + 10)
    r = {
        "empty": lambda: post(files={"file": ("empty.jpg", b"", "image/jpeg")}),
        "text": lambda: post(files={"file": ("notes.txt", b"just some text\n" * 20, "text/plain")}),
        "truncated": lambda: post(files={"file": ("cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}),
        "bomb": lambda: post(files={"file": ("bomb.png", png_bomb(), "image/png")}),
        "missing_field": lambda: post(files={"photo": ("a.jpg", jpeg, "image/jpeg")}),
        "too_large": lambda: post(content=big, headers={"content-type": "image/jpeg"}),
        # no Content-Length: the server has to count while reading
        "too_large_streamed": lambda: post(content=iter([big[:600_000], big[600_000:]]),
                                           headers={"content-type": "image/jpeg"}),
        "beam_out_of_range": lambda: client.post("/api/caption?beam=11", content=jpeg),
        "n_best_over_beam": lambda: client.post("/api/caption?beam=2&n_best=3", content=jpeg),
    }[kind]()
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and words in detail
    if kind in ("text", "truncated", "bomb"):
        assert detail.startswith({"text": "notes.txt", "truncated": "cut.jpg", "bomb": "bomb.png"}[kind])


def test_empty_raw_body(client):
    r = client.post("/api/caption", content=b"", headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "empty" in r.json()["detail"]


# ---- concurrency: the event loop stays free, queued requests share one batch ------------------------

class GatedCaptioner:
    """The real captioner behind a gate: caption_batch waits until the test opens it, and records sizes."""

    def __init__(self, inner):
        self.inner, self.gate, self.entered, self.sizes = inner, threading.Event(), threading.Event(), []

    @property
    def info(self):
        return self.inner.info

    def caption_batch(self, images, **kw):
        self.sizes.append(len(images))
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.caption_batch(images, **kw)


def test_health_answers_while_busy_and_requests_are_batched(captioner, photos):
    gated = GatedCaptioner(captioner)
    with TestClient(create_app(gated, batch_wait_ms=1), base_url=LOCAL) as client:
        results = {}

        def post(i, data):
            results[i] = client.post("/api/caption", content=data)
        first = threading.Thread(target=post, args=(0, photos[0].read_bytes()))
        first.start()
        assert gated.entered.wait(10)
        t = time.perf_counter()
        assert client.get("/api/health").status_code == 200  # while the model is busy
        assert time.perf_counter() - t < 2
        # a bad upload is refused without waiting for the busy model
        post(4, b"not an image")
        assert results[4].status_code == 422 and not gated.gate.is_set()
        # good ones queue up behind the busy model and then share one batch
        others = [threading.Thread(target=post, args=(i, photos[i].read_bytes())) for i in (1, 2, 3)]
        for th in others:
            th.start()
        deadline = time.time() + 10
        while client.app.state.batcher._queue.qsize() < len(others) and time.time() < deadline:
            time.sleep(0.01)
        gated.gate.set()
        for th in [first, *others]:
            th.join(30)
    assert gated.sizes == [1, len(others)]
    for i, path in enumerate(photos[:4]):
        assert results[i].status_code == 200
        assert results[i].json()["caption"] == captioner.caption(path.read_bytes()).caption


# ---- the rest of the API -----------------------------------------------------------------------------

def test_model_info_and_page(client, captioner):
    info = client.get("/api/model").json()
    assert info["vocab_size"] == captioner.info["vocab_size"] > 100
    assert {"name", "encoder", "dev_scores", "grid"} <= set(info)
    page = client.get("/")
    assert page.status_code == 200 and 'id="caption"' in page.text and 'aria-live="polite"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in client.get("/static/index.html").text.replace("http-equiv", "")  # no CDN
    assert client.get("/api/search?q=dog").status_code == 404  # no library given


def test_library_search_and_images(captioner, photos, tmp_path):
    from captioner.apps.library import index_folder
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    db = tmp_path / "lib.sqlite"
    index_folder(folder, db, captioner)
    word = max(captioner.caption(photos[0]).tokens, key=len)  # a content word of that photo's caption
    with TestClient(create_app(captioner, db=db), base_url=LOCAL) as client:
        assert client.get("/api/health").json()["search"] is True
        hits = client.get("/api/search", params={"q": word}).json()["results"]
        assert hits and any(word in h["caption"] for h in hits)
        assert hits[0]["path"].startswith("photos/")  # relative to the indexed folder: no host paths
        image = client.get("/api/library/image", params={"path": hits[0]["path"]})
        assert image.status_code == 200 and image.content == (tmp_path / hits[0]["path"]).read_bytes()
        # real files that are not in the library are refused
        for outside in (str(photos[4]), "/etc/passwd", str(db)):
            r = client.get("/api/library/image", params={"path": outside})
            assert r.status_code == 404 and "not in the library" in r.json()["detail"]
    with pytest.raises(ValueError, match="nope.sqlite"):
        create_app(captioner, db=tmp_path / "nope.sqlite")


def test_cli_serve_bad_arguments_fail_in_one_line(tmp_path, capsys):
    from captioner.apps.cli import main
    assert main(["serve", "--db", str(tmp_path / "missing.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: serve:") and "missing.sqlite" in err and "\n" not in err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    assert main(["serve", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.safetensors" in err and "\n" not in err
