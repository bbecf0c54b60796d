"""Videos to timed descriptions (`captioner caption clip.mp4 --vtt`, `captioner live`), on clips made here with
PyAV from still photos, so the true cut times are known."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from captioner.apps.cli import main
from captioner.apps.video import Frame, SceneCuts, VideoError, describe_video, to_json, to_srt, to_vtt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PHOTOS = ["camera.jpg", "cat.jpg", "astronaut.jpg"]  # the model describes each differently
SECONDS = [2.5, 3.0, 2.0]  # scenes: 0-2.5, 2.5-5.5, 5.5-7.5
TIMING = re.compile(r"^(\d{2}):([0-5]\d):([0-5]\d)\.(\d{3}) --> (\d{2}):([0-5]\d):([0-5]\d)\.(\d{3})$")


def make_clip(path: Path, photos: list[Path], seconds: list[float], fps: int = 10, size=(320, 240),
              codec: str = "mpeg4") -> Path:
    """An MP4 (MPEG-4 Part 2, index at the front so a truncated copy still opens) of each photo held still;
    codec="libx264" makes one browsers play (H.264)."""
    import av
    from PIL import Image
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for photo, secs in zip(photos, seconds):
            frame = np.asarray(Image.open(photo).convert("RGB").resize(size))
            for _ in range(round(secs * fps)):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


def true_scenes() -> list[tuple[float, float]]:
    ends = np.cumsum(SECONDS)
    return list(zip([0.0, *ends[:-1]], ends))


def parse_vtt(text: str) -> list[dict]:
    """WebVTT structure: the header, then blank-line separated cues, each an optional identifier, a timing line
    HH:MM:SS.mmm --> HH:MM:SS.mmm, and text lines (no "-->", no blank line); times in order."""
    blocks = text.strip("\n").split("\n\n")
    assert blocks[0] == "WEBVTT", blocks[0]
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        if not TIMING.match(lines[0]):
            lines = lines[1:]  # the cue identifier
        m = TIMING.match(lines[0])
        assert m, block
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        start, end = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        text_lines = lines[1:]
        assert text_lines and all(line.strip() and "-->" not in line for line in text_lines), block
        cues.append({"start": start, "end": end, "text": " ".join(text_lines)})
    for a, b in zip(cues, cues[1:]):
        assert a["start"] < a["end"] <= b["start"] < b["end"], (a, b)
    return cues


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "clip.mp4", [EXAMPLES / p for p in PHOTOS], SECONDS)


@pytest.fixture(scope="module")
def captioner(model_path):
    from captioner.apps.api import Captioner
    return Captioner.load(model_path)


def test_scene_cuts_ignore_exposure_and_flashes_but_not_new_scenes():
    rng = np.random.default_rng(0)
    a, b = rng.random((32, 32)).astype(np.float32), rng.random((32, 32)).astype(np.float32)
    frame = lambda t, thumb: Frame(t, thumb, np.zeros((2, 2, 3), np.uint8))  # noqa: E731
    cut = SceneCuts(threshold=0.12, min_scene_s=0.5)
    assert cut(frame(0.0, a))                       # the first frame starts a scene
    assert not cut(frame(0.25, a * 0.8 + 0.1))      # the camera adjusting its exposure: same scene
    assert not cut(frame(0.5, a + rng.normal(0, 0.02, a.shape).astype(np.float32)))  # sensor noise
    assert cut(frame(0.75, b))                      # another view
    assert not cut(frame(1.0, a))                   # 0.25 s later: too soon for another scene
    assert cut(frame(1.25, a))


def test_caption_video_vtt_one_cue_per_scene_at_the_cuts(clip, model_path, capsys):
    assert main(["caption", str(clip), "--vtt", "--model", str(model_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    cues = parse_vtt(out)
    assert len(cues) == len(PHOTOS), out
    for cue, (start, end) in zip(cues, true_scenes()):
        assert abs(cue["start"] - start) <= 0.5 and abs(cue["end"] - end) <= 0.5, (cue, start, end)
    assert len({c["text"] for c in cues}) == len(PHOTOS)  # each scene described on its own


def test_truncated_video_keeps_the_cues_before_the_damage(clip, model_path, capsys, tmp_path):
    assert main(["caption", str(clip), "--vtt", "--model", str(model_path), "--no-progress"]) == 0
    full = parse_vtt(capsys.readouterr().out)
    cut = tmp_path / "cut.mp4"
    data = clip.read_bytes()
    cut.write_bytes(data[:int(len(data) * 0.6)])
    assert main(["caption", str(cut), "--vtt", "--model", str(model_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    kept = parse_vtt(captured.out)
    assert 1 <= len(kept) < len(full)
    assert kept[0] == full[0]  # the scene wholly before the damage, as in the whole video
    assert [c["start"] for c in kept] == [c["start"] for c in full[:len(kept)]]
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {cut}: ") and "truncated" in errors[0], captured.err


def test_not_a_video_and_mixed_inputs_are_one_line_errors(model_path, capsys, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("these are not video frames\n" * 50)
    assert main(["caption", str(bad), "--json", "--model", str(model_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [{"source": str(bad), "error": captured.err.strip()[len("error: "):],
                                         "cues": []}]
    assert captured.err.count("\n") == 1 and str(bad) in captured.err and "cannot open" in captured.err
    assert main(["caption", str(bad), str(EXAMPLES / "cat.jpg")]) == 2
    assert "either videos or images" in capsys.readouterr().err
    assert main(["caption", str(EXAMPLES / "cat.jpg"), "--srt"]) == 2


def test_python_api_srt_json_and_live_lines(clip, captioner, model_path, capsys):
    cues = describe_video(captioner, clip, batch_size=2)  # scenes split over caption batches
    assert [round(c.start * 4) / 4 for c in cues] == [s for s, _ in true_scenes()]
    # each cue is what the captioner says of that scene's frame: a hedged text when unsure, tags from concepts
    for c in cues:
        assert c.text and c.caption and (c.text == c.caption or not c.text.startswith(c.caption) or c.tags)
    srt = to_srt(cues)
    assert srt.splitlines()[:2] == ["1", "00:00:00,000 --> " + to_vtt(cues).splitlines()[3].split(" --> ")[1]
                                    .replace(".", ",")]
    doc = json.loads(to_json(cues, clip))
    assert doc["source"] == str(clip) and doc["error"] is None
    assert [d["text"] for d in doc["cues"]] == [c.text for c in cues]
    with pytest.raises(VideoError, match="no such file|cannot open"):
        describe_video(captioner, clip.with_name("missing.mp4"))

    # live: one JSON line per scene change, as soon as the scene has settled
    assert main(["live", str(clip), "--json", "--model", str(model_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(PHOTOS)
    for line, (start, _) in zip(lines, true_scenes()):
        assert abs(line["start"] - start) <= 0.5 and line["text"] and "end" not in line


def test_server_video_upload_gives_the_same_cues_and_vtt(clip, captioner):
    from fastapi.testclient import TestClient

    from captioner.apps.server import create_app
    expected = describe_video(captioner, clip)
    data = clip.read_bytes()
    with TestClient(create_app(captioner), base_url="http://127.0.0.1:8000") as client:
        r = client.post("/api/video", files={"file": ("holiday.mp4", data, "video/mp4")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["error"] is None and [c["text"] for c in body["cues"]] == [c.text for c in expected]
        assert [c["start"] for c in body["cues"]] == [c.start for c in expected]
        assert parse_vtt(body["vtt"]) == parse_vtt(to_vtt(expected))
        # truncated: the cues before the damage, and the damage named by the upload's name, not a server path
        r = client.post("/api/video", content=data[:int(len(data) * 0.6)], headers={"content-type": "video/mp4"})
        body = r.json()
        assert r.status_code == 200 and 1 <= len(body["cues"]) < len(expected)
        assert body["error"].startswith("upload: truncated") and "/" not in body["error"]
        r = client.post("/api/video", files={"file": ("notes.mp4", b"no video here" * 40, "video/mp4")})
        assert r.status_code == 422 and r.json()["detail"].startswith("notes.mp4: cannot open as a video")
        r = client.post("/api/video", content=data, headers={"origin": "http://attacker.example"})
        assert r.status_code == 403
