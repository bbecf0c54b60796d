"""The same photo and settings give the same description alone, in any batch, through `evaluate` and through
the server under concurrent load (int8 decoding with fixed activation ranges, model.quantize_int8)."""
import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from captioner.apps.api import Captioner
from captioner.apps.server import create_app

LOCAL = "http://127.0.0.1:8000"
EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))


@pytest.fixture(scope="module")
def captioner(model_path):
    c = Captioner.load(model_path)
    assert c.info["decoder_weights"] == "int8", "the shipped model should decode with int8 weights"
    return c


@pytest.fixture(scope="module")
def photos(flickr8k_root) -> list[Path]:
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:27]
    return [flickr8k_root / "images" / n for n in names] + EXAMPLES  # 32 photos, Flickr8k-like and not


def _key(r):
    return r.text, r.caption, r.score, r.confidence


@pytest.fixture(scope="module")
def alone(captioner, photos):
    return {p: _key(captioner.caption(p)) for p in photos}


@pytest.mark.parametrize("batch_size", [2, 5, 13, 32, 64])
def test_batches_give_the_captions_of_photos_alone(captioner, photos, alone, batch_size):
    items = (photos * 2)[:64]  # 64 items: every batch size up to 64, photos repeated inside a batch too
    got = [r for i in range(0, len(items), batch_size) for r in captioner.caption_batch(items[i:i + batch_size])]
    assert [_key(r) for r in got] == [alone[p] for p in items]


def test_float_decoder_is_deterministic_too(captioner, photos):
    exact = Captioner(captioner.runtime.checkpoint, captioner.encoder, int8=False)
    one = [_key(exact.caption(p)) for p in photos[:8]]
    assert [_key(r) for r in exact.caption_batch(photos[:8])] == one


def test_evaluate_scores_the_captions_users_get(captioner, tiny_workdir, tmp_path):
    """`evaluate` reads grids from the feature store; `caption` encodes the photo: same caption either way."""
    from captioner.data.datasets import load_prepared
    from captioner.evaluation.evaluate import evaluate
    model = captioner.runtime.path
    evaluate(model, tiny_workdir, "dev", beam_size=3, out=tmp_path, meteor=False, progress=False)
    scored = {c["image_id"]: c["caption"] for c in json.loads((tmp_path / "captions.json").read_text())}
    records = load_prepared(tiny_workdir).split("dev")
    assert len(scored) == len(records) == 4
    for r in records:
        assert scored[r.image_id] == captioner.caption(r.path).text


def test_server_under_8_concurrent_clients_matches_caption_alone(captioner, photos, alone):
    app = create_app(captioner, max_upload_mb=2)
    results, errors = {}, []
    with TestClient(app, base_url=LOCAL) as client:
        def worker(k):
            for p in photos[k::8]:
                r = client.post("/api/caption", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    results[p] = r.json()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == len(photos)
    for p, body in results.items():
        text, caption, score, confidence = alone[p]
        assert (body["text"], body["caption"], body["confidence"]) == (text, caption, confidence), p.name
        assert body["score"] == pytest.approx(score, abs=1e-4)
