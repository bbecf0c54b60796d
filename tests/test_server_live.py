"""The live WebSocket (/api/live), in-process with FastAPI's TestClient, against the real shipped model."""
import os
import threading
import time

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from test_server import LOCAL, TRAIN_IMAGES, GatedCaptioner

from captioner.apps.server import create_app

LIVE = "ws://127.0.0.1:8000/api/live"  # TestClient's websocket_connect does not use base_url
SAME_ORIGIN = {"origin": LOCAL}


@pytest.fixture(scope="module")
def captioner(model_path):
    from captioner.apps.api import Captioner
    return Captioner.load(model_path)


@pytest.fixture(scope="module")
def frames(flickr8k_root) -> list[bytes]:
    return [(flickr8k_root / "images" / name).read_bytes() for name in TRAIN_IMAGES]


def test_frames_get_the_python_api_description_and_bad_frames_keep_the_socket(captioner, frames):
    with TestClient(create_app(captioner, max_upload_mb=1), base_url=LOCAL) as client, \
            client.websocket_connect(LIVE + "?beam=3", headers=SAME_ORIGIN) as ws:
        ws.send_bytes(frames[0])
        answer = ws.receive_json()
        expected = captioner.caption(frames[0])
        assert answer["frame"] == 1 and answer["text"] == expected.text and answer["caption"] == expected.caption
        assert answer["concepts"] == expected.concepts and answer["ms"] > 0 and answer["dropped"] == 0
        for bad, words in ((b"not a photo", "frame 2: not an image"), (os.urandom(1024 * 1024 + 1), "limit"),
                           (b"", "empty")):
            ws.send_bytes(bad)
            answer = ws.receive_json()
            assert words in answer["error"] and "\n" not in answer["error"] and "text" not in answer
        ws.send_text("frames are binary messages; text is ignored")
        ws.send_bytes(frames[1])
        answer = ws.receive_json()
        assert answer["frame"] == 5 and answer["text"] == captioner.caption(frames[1]).text


def test_newest_frame_wins_and_clients_share_batches(captioner, frames):
    gated = GatedCaptioner(captioner)
    with TestClient(create_app(gated, batch_wait_ms=1), base_url=LOCAL) as client, \
            client.websocket_connect(LIVE, headers=SAME_ORIGIN) as a, \
            client.websocket_connect(LIVE, headers=SAME_ORIGIN) as b, \
            client.websocket_connect(LIVE, headers=SAME_ORIGIN) as c:
        a.send_bytes(frames[0])
        assert gated.entered.wait(10)
        for data in frames[1:4]:  # while frame 1 is captioned: these replace each other, none queues
            a.send_bytes(data)
        b.send_bytes(frames[1])
        c.send_bytes(frames[2])
        deadline = time.time() + 10
        while client.app.state.batcher._queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # lets the server read client a's frames too
        gated.gate.set()
        answers = [a.receive_json(), a.receive_json()]
        assert [x["frame"] for x in answers] == [1, 4] and answers[1]["dropped"] == 2
        assert answers[1]["text"] == captioner.caption(frames[3]).text
        assert b.receive_json()["text"] == captioner.caption(frames[1]).text
        assert c.receive_json()["text"] == captioner.caption(frames[2]).text
    # b's and c's frames, waiting together, went in one batch (with a's frame 4 if it was sent in time)
    assert gated.sizes[0] == 1 and gated.sizes[1] >= 2 and sum(gated.sizes) == 4, gated.sizes


def test_cross_origin_and_foreign_host_websockets_are_refused_like_posts(captioner):
    app = create_app(captioner, allow_hosts=["captions.example.org"])
    with TestClient(app, base_url=LOCAL) as client:
        for url, headers, status, words in (
                (LIVE, {"origin": "http://attacker.example"}, 403, "cross-origin WebSocket"),
                (LIVE, {"origin": "null"}, 403, "cross-origin WebSocket"),
                ("ws://attacker.example/api/live", {"origin": "http://attacker.example"}, 421, "--allow-host")):
            with pytest.raises(WebSocketDenialResponse) as refused:
                with client.websocket_connect(url, headers=headers):
                    pass
            assert refused.value.status_code == status and words in refused.value.json()["detail"]
        post = client.post("/api/caption", content=b"x", headers={"origin": "http://attacker.example"})
        assert post.status_code == 403  # the same rule as for POSTs
        # the page's own origin, a name given with --allow-host, and clients that send no Origin (not browsers)
        for url, headers in ((LIVE, SAME_ORIGIN), ("ws://captions.example.org/api/live",
                                                   {"origin": "https://captions.example.org"}), (LIVE, {})):
            with client.websocket_connect(url, headers=headers) as ws:
                ws.send_bytes(b"")
                assert "empty" in ws.receive_json()["error"]


def test_client_leaving_mid_caption_does_not_break_the_server(captioner, frames):
    gated = GatedCaptioner(captioner)
    with TestClient(create_app(gated), base_url=LOCAL) as client:
        with client.websocket_connect(LIVE, headers=SAME_ORIGIN) as ws:
            ws.send_bytes(frames[0])
            assert gated.entered.wait(10)
        threading.Timer(0.2, gated.gate.set).start()  # the answer has nobody to go to
        with client.websocket_connect(LIVE, headers=SAME_ORIGIN) as ws:
            ws.send_bytes(frames[1])
            assert ws.receive_json()["text"] == captioner.caption(frames[1]).text
        assert client.get("/api/health").status_code == 200
