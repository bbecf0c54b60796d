"""Videos in the library: `captioner index` describes each video scene by scene (video.describe_video) and
`captioner search` finds a scene with its file and time. Clips are made from still photos (test_video.make_clip),
so their scenes are known; the real shipped model describes them."""
import json
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from test_video import EXAMPLES, PHOTOS, SECONDS, make_clip, true_scenes

from captioner.apps import cli
from captioner.apps.library import STOP_WORDS, failures, index_folder, lemma, search, tags, words
from captioner.apps.video import VideoError, clock, describe_video

PHOTO = EXAMPLES / "coffee.jpg"  # a photo next to the videos; described unlike any scene of the clip

# The schema of the libraries made before videos were indexed (version 1), as that code wrote it.
OLD_SCHEMA = """
CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha256 TEXT, caption TEXT, nbest TEXT, tags TEXT, model TEXT, captioned_at TEXT,
    error TEXT);
CREATE VIRTUAL TABLE images_fts USING fts5(caption, alternatives, tags, tokenize = 'porter unicode61');
CREATE TABLE tags (image_id INTEGER NOT NULL, tag TEXT NOT NULL);
CREATE INDEX tags_by_image ON tags(image_id);
CREATE INDEX tags_by_tag ON tags(tag);
CREATE TABLE roots (folder TEXT PRIMARY KEY, indexed_at TEXT);
PRAGMA user_version = 1;
"""


class Counting:
    """The real captioner, counting its caption_batch calls; the call numbered `stop_on` raises
    KeyboardInterrupt instead, as a user stopping `captioner index` part way."""

    def __init__(self, captioner, stop_on: int | None = None):
        self.captioner, self.info, self.stop_on, self.calls = captioner, captioner.info, stop_on, 0

    def caption_batch(self, images, **options):
        self.calls += 1
        if self.calls == self.stop_on:
            raise KeyboardInterrupt
        return self.captioner.caption_batch(images, **options)


@pytest.fixture(scope="module")
def captioner(model_path):
    from captioner.apps.api import Captioner
    return Captioner.load(model_path)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("video") / "clip.mp4", [EXAMPLES / p for p in PHOTOS], SECONDS)


@pytest.fixture(scope="module")
def cues(captioner, clip) -> list:
    """The scenes the video module reports for the clip: what the library must hold."""
    found = describe_video(captioner, clip)
    assert [(round(c.start * 2) / 2, round(c.end * 2) / 2) for c in found] == true_scenes()  # the photos' cuts
    return found


@pytest.fixture
def folder(tmp_path, clip) -> Path:
    d = tmp_path / "media"
    (d / "videos").mkdir(parents=True)
    shutil.copy(PHOTO, d / PHOTO.name)
    shutil.copy(clip, d / "videos" / "clip.mp4")
    return d


def own_words(captioner, cues) -> dict[int, list[str]]:
    """For each scene, its indexed content words that no other scene and not the photo has (plurals folded)."""
    photo = captioner.caption(PHOTO, n_best=3)
    texts = [" ".join([c.text, c.caption, *c.tags]) for c in cues]
    texts.append(" ".join([photo.text, *(a["caption"] for a in photo.alternatives),
                           *(c["word"] for c in photo.concepts)]))
    vocab = [{lemma(w) for w in words(t)} - STOP_WORDS for t in texts]
    own = {i: sorted(v - set().union(*(o for j, o in enumerate(vocab) if j != i))) for i, v in enumerate(vocab[:-1])}
    return {i: w for i, w in own.items() if w}


def test_index_folder_finds_each_scene_with_its_file_and_time(folder, captioner, cues, capsys):
    db = folder.parent / "lib.sqlite"
    s = index_folder(folder, db, captioner, progress=False)
    assert (s["found"], s["videos"], s["captioned"], s["described"], s["scenes"], s["failed"]) == (1, 1, 1, 1, 3, 0)
    video = str(folder / "videos" / "clip.mp4")
    own = own_words(captioner, cues)
    assert len(own) >= 2, f"too few scenes with a word of their own: {cues}"
    for i, scene_words in own.items():
        for query in (cues[i].text, " ".join(scene_words)):  # its description, and just its own words
            hit = search(db, query)[0]
            assert (hit["path"], hit["start"], hit["end"]) == (video, cues[i].start, cues[i].end), (query, hit)
            assert hit["caption"] == cues[i].text and set(cues[i].tags) <= set(hit["tags"])
    # the photo: found as before, without times
    photo_hit = search(db, captioner.caption(PHOTO).text)[0]
    assert photo_hit["path"] == str(folder / PHOTO.name) and "start" not in photo_hit
    # tags count files: a video once, however many of its scenes carry the tag
    person = sum(("person" in c.tags) for c in cues)
    assert person >= 2 and dict(tags(db))["person"] == 1 + ("person" in photo_hit["tags"])

    i, scene_words = next(iter(own.items()))
    assert cli.main(["search", " ".join(scene_words), "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"  {video} {clock(cues[i].start)}-{clock(cues[i].end)}")  # file and time
    assert lines[1].strip() == cues[i].text
    assert cli.main(["search", " ".join(scene_words), "--db", str(db), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]
    assert (top["path"], top["start"], top["end"]) == (video, cues[i].start, cues[i].end)


def test_a_library_made_before_videos_is_searched_then_migrated(folder, captioner, cues):
    db = folder.parent / "old.sqlite"
    photo = folder / PHOTO.name
    st = photo.stat()
    with closing(sqlite3.connect(db)) as con, con:
        con.executescript(OLD_SCHEMA)
        row = con.execute("INSERT INTO images (path, size, mtime_ns, sha256, caption, tags, model, captioned_at) "
                          "VALUES (?, ?, ?, 'x', 'an old sepia postcard', '[\"postcard\"]', 'old', '2024') "
                          "RETURNING id", (str(photo), st.st_size, st.st_mtime_ns)).fetchone()[0]
        con.execute("INSERT INTO images_fts (rowid, caption, alternatives, tags) VALUES (?, ?, '', 'postcard')",
                    (row, "an old sepia postcard"))
        con.execute("INSERT INTO tags VALUES (?, 'postcard')", (row,))
    # searched as it is (read-only: nothing added to it)
    assert [(h["path"], h["caption"]) for h in search(db, "sepia postcard")] == [(str(photo), "an old sepia postcard")]
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 1
        assert not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'scenes'").fetchone()

    s = index_folder(folder, db, captioner, progress=False)  # migrates, keeps the photo's row, adds the video
    assert (s["unchanged"], s["captioned"], s["described"], s["scenes"]) == (1, 0, 1, len(cues))
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2
        assert con.execute("SELECT id, caption FROM images WHERE path = ?", (str(photo),)).fetchone() == (
            row, "an old sepia postcard")
    assert search(db, "sepia postcard")[0]["path"] == str(photo)
    hit = search(db, cues[0].text)[0]
    assert (hit["path"], hit["start"], hit["end"]) == (str(folder / "videos" / "clip.mp4"), cues[0].start, cues[0].end)
    assert dict(tags(db))["postcard"] == 1


def test_bad_videos_are_one_line_each_and_the_rest_is_indexed(folder, captioner, cues, clip, monkeypatch, capsys):
    from captioner.apps.api import Captioner
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: captioner))  # no second model load
    data = clip.read_bytes()
    cut, notes = folder / "videos" / "cut.mp4", folder / "notes.webm"
    cut.write_bytes(data[:int(len(data) * 0.6)])  # truncated part way through the second scene
    notes.write_text("these are not video frames\n" * 50)
    with pytest.raises(VideoError) as damage:
        describe_video(captioner, cut)
    kept = damage.value.cues  # what the video module keeps of it
    assert 1 <= len(kept) < len(cues)
    db = folder.parent / "lib.sqlite"
    assert cli.main(["index", str(folder), "--db", str(db), "--no-progress"]) == 0
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2, captured.err
    assert errors[0].startswith(f"skipped {notes}: cannot open as a video")
    assert errors[1] == f"skipped {damage.value} ({len(kept)} scene{'s' * (len(kept) > 1)} before it indexed)"
    assert "truncated" in errors[1]
    assert "1 images and 3 videos" in captured.out
    assert f"1 videos described ({len(cues) + len(kept)} scenes)" in captured.out
    assert "2 unreadable" in captured.out
    assert [p for p, _ in failures(db)] == [str(notes), str(cut)]
    # the good video and the photo are there; the damaged one's first scene too
    hits = search(db, cues[0].text)
    assert {(h["path"], h["start"]) for h in hits[:2]} == {(str(folder / "videos" / "clip.mp4"), 0.0), (str(cut), 0.0)}
    assert search(db, captioner.caption(PHOTO).text)[0]["path"] == str(folder / PHOTO.name)
    # unchanged bad files are not retried
    assert cli.main(["index", str(folder), "--db", str(db), "--no-progress"]) == 0
    assert "4 unchanged" in capsys.readouterr().out


def test_rerun_skips_unchanged_videos_and_resumes_an_interrupted_run(folder, captioner, cues, clip):
    db = folder.parent / "lib.sqlite"
    shutil.copy(clip, folder / "videos" / "later.mp4")
    # stopped while describing the second video: the photo and the first video were committed
    with pytest.raises(KeyboardInterrupt):
        index_folder(folder, db, Counting(captioner, stop_on=3), progress=False)  # photo, clip.mp4, later.mp4
    run = Counting(captioner)
    s = index_folder(folder, db, run, progress=False)
    assert (s["unchanged"], s["described"], s["scenes"], run.calls) == (2, 1, len(cues), 1)
    run = Counting(captioner)
    s = index_folder(folder, db, run, progress=False)
    assert (s["unchanged"], s["described"], run.calls) == (3, 0, 0)

    # touched (same content): not described again; replaced: described again, its old scenes gone
    video = folder / "videos" / "clip.mp4"
    st = video.stat()
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    make_clip(folder / "videos" / "later.mp4", [EXAMPLES / "rocket.jpg"], [2.0])
    s = index_folder(folder, db, run, progress=False)
    assert (s["touched"], s["described"], s["scenes"], run.calls) == (1, 1, 1, 1)

    def stored():
        with closing(sqlite3.connect(db)) as con:
            return (con.execute("SELECT count(*) FROM scenes").fetchone()[0],
                    con.execute("SELECT count(*) FROM images_fts").fetchone()[0])
    assert stored() == (len(cues) + 1, 1 + len(cues) + 1)  # scenes; text rows: the photo's and each scene's
    # a deleted video leaves nothing behind: not its scenes, not their text
    video.unlink()
    assert index_folder(folder, db, run, progress=False)["removed"] == 1
    assert stored() == (1, 2)
    assert all(h["path"] != str(video) for h in search(db, cues[0].text))


def test_server_search_gives_scene_times_and_serves_the_video_for_seeking(folder, captioner, cues):
    from fastapi.testclient import TestClient

    from captioner.apps.server import create_app
    db = folder.parent / "lib.sqlite"
    index_folder(folder, db, captioner, progress=False)
    data = (folder / "videos" / "clip.mp4").read_bytes()
    with TestClient(create_app(captioner, db=db), base_url="http://127.0.0.1:8000") as client:
        hit = client.get("/api/search", params={"q": cues[0].text}).json()["results"][0]
        # named relative to the indexed folder (no host paths), with the scene's times
        assert (hit["path"], hit["start"], hit["end"]) == ("media/videos/clip.mp4", cues[0].start, cues[0].end)
        r = client.get("/api/library/image", params={"path": hit["path"]})
        assert r.status_code == 200 and r.content == data and r.headers["content-type"] == "video/mp4"
        # what a browser asks for to play from #t=start: a byte range
        r = client.get("/api/library/image", params={"path": hit["path"]}, headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == data[1000:2000]
