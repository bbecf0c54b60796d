"""Photo library: incremental indexing into SQLite, FTS5 search, tags, and the CLI around them.

Most tests use a tiny stand-in captioner that names an image's dominant colour, so the indexing logic is
checked exactly and fast; the slow tests caption real Flickr8k photos with the shipped model.
"""
import io
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field

import pytest
from PIL import Image

from captioner.apps import cli
from captioner.apps.library import (STOP_WORDS, caption_tags, failures, fts_query, index_folder, lemma, search,
                                    tags, words)

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}


@dataclass
class FakeResult:
    caption: str
    score: float
    alternatives: list = field(default_factory=list)
    concepts: list = field(default_factory=list)

    @property
    def text(self) -> str:  # an unhedged description: what the model wrote
        return self.caption


class ColourCaptioner:
    """Implements the part of captioner.Captioner the library uses: .info and .caption_batch."""
    info = {"name": "colour-test"}

    def __init__(self, fail_on_call: int | None = None):
        self.captioned = 0          # images captioned so far
        self.calls = 0
        self.fail_on_call = fail_on_call

    def caption_batch(self, images, *, beam_size=None, n_best=1, attention=False):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # simulates the user stopping a run mid-way
        out = []
        for data in images:
            try:
                rgb = Image.open(io.BytesIO(data)).convert("RGB").resize((1, 1)).getpixel((0, 0))
            except Exception as e:  # the real Captioner returns ImageError items the same way
                out.append(ValueError(f"cannot identify image ({e})"))
                continue
            name = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))
            alts = [{"caption": f"a {name} square on a plain background", "score": -1.0},
                    {"caption": f"two {name} boxes", "score": -2.0},
                    {"caption": f"a square of {name} colour", "score": -3.0}][:n_best]
            out.append(FakeResult(alts[0]["caption"], -1.0, alts))
            self.captioned += 1
        return out


def save(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), COLOURS[colour]).save(path)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    save(d / "red.jpg", "red")
    save(d / "green.png", "green")
    save(d / "sub" / "deeper" / "blue.JPEG", "blue")
    (d / "notes.txt").write_text("not an image")
    save(d / ".hidden" / "skip.jpg", "yellow")
    return d


def rows(db):
    with sqlite3.connect(db) as con:
        return {os.path.basename(p): (c, e) for p, c, e in con.execute("SELECT path, caption, error FROM images")}


def test_words_tags_and_lemmas():
    assert lemma("dogs") == "dog" and lemma("children") == "child" and lemma("puppies") == "puppy"
    assert lemma("grass") == "grass" and lemma("bus") == "bus" and lemma("benches") == "bench"
    t = caption_tags(["a black dog runs through the snow", "two dogs run in snow", "the dog's ball"])
    assert t[:3] == ["dog", "run", "snow"]             # most frequent first, ties in first-seen order
    assert not {"a", "the", "two", "in", "through"} & set(t)
    assert "ball" in t and "dog's" not in t


def test_index_then_incremental_reindex(folder, tmp_path):
    db = tmp_path / "lib.sqlite"
    cap = ColourCaptioner()
    s = index_folder(folder, db, cap, progress=False)
    assert (s["found"], s["captioned"], s["failed"], s["removed"]) == (3, 3, 0, 0)
    assert s["model"] == "colour-test"
    r = rows(db)
    assert r["red.jpg"][0] == "a red square on a plain background" and r["blue.JPEG"][0].startswith("a blue")
    assert "skip.jpg" not in r and "notes.txt" not in r
    with sqlite3.connect(db) as con:
        size, sha, nbest, model, date = con.execute(
            "SELECT size, sha256, nbest, model, captioned_at FROM images WHERE path LIKE '%red.jpg'").fetchone()
    assert size == (folder / "red.jpg").stat().st_size and len(sha) == 64 and model == "colour-test" and date
    assert [a["caption"] for a in json.loads(nbest)][1] == "two red boxes"
    assert dict(tags(db))["square"] == 3 and dict(tags(db))["red"] == 1

    # nothing changed: nothing captioned
    s = index_folder(folder, db, cap, progress=False)
    assert (s["captioned"], s["unchanged"]) == (0, 3) and cap.captioned == 3

    # add one, change one (new content), touch one (same content), delete one
    save(folder / "new" / "yellow.webp", "yellow")
    save(folder / "green.png", "blue")
    st = (folder / "red.jpg").stat()
    os.utime(folder / "red.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (folder / "sub" / "deeper" / "blue.JPEG").unlink()
    s = index_folder(folder, db, cap, progress=False)
    assert (s["captioned"], s["touched"], s["removed"], s["unchanged"]) == (2, 1, 1, 0)
    assert cap.captioned == 5
    r = rows(db)
    assert set(r) == {"red.jpg", "green.png", "yellow.webp"}
    assert r["green.png"][0].startswith("a blue") and r["yellow.webp"][0].startswith("a yellow")
    assert [h["path"] for h in search(db, "blue")] == [str(folder / "green.png")]
    assert "green" not in dict(tags(db))  # tags of replaced and deleted captions are gone too

    # a new model: --recaption captions every file again and records the model
    class NewModel(ColourCaptioner):
        info = {"name": "colour-test-2"}
    new = NewModel()
    s = index_folder(folder, db, new, progress=False, recaption=True)
    assert (s["captioned"], s["unchanged"], s["touched"]) == (3, 0, 0) and new.captioned == 3
    with sqlite3.connect(db) as con:
        assert {m for (m,) in con.execute("SELECT model FROM images")} == {"colour-test-2"}


def test_unreadable_image_recorded_not_fatal(folder, tmp_path):
    db = tmp_path / "lib.sqlite"
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    cap = ColourCaptioner()
    s = index_folder(folder, db, cap, progress=False)
    assert (s["captioned"], s["failed"]) == (3, 1)
    assert len(s["errors"]) == 1 and s["errors"][0].startswith(str(folder / "broken.jpg") + ":")
    assert "\n" not in s["errors"][0]
    assert failures(db) == [(str(folder / "broken.jpg"), s["errors"][0])]
    assert rows(db)["broken.jpg"][0] is None
    # unchanged broken file is not retried; once repaired it is captioned
    assert index_folder(folder, db, cap, progress=False)["failed"] == 0 and cap.captioned == 3
    save(folder / "broken.jpg", "yellow")
    s = index_folder(folder, db, cap, progress=False)
    assert s["captioned"] == 1 and failures(db) == []


def test_interrupted_run_keeps_finished_batches(folder, tmp_path):
    db = tmp_path / "lib.sqlite"
    with pytest.raises(KeyboardInterrupt):
        index_folder(folder, db, ColourCaptioner(fail_on_call=2), batch_size=1, progress=False)
    assert len(rows(db)) == 1  # the first batch was committed
    cap = ColourCaptioner()
    s = index_folder(folder, db, cap, progress=False)
    assert (s["captioned"], s["unchanged"]) == (2, 1)


def test_search_ranks_and_treats_syntax_as_text(folder, tmp_path):
    db = tmp_path / "lib.sqlite"
    index_folder(folder, db, ColourCaptioner(), progress=False)
    hits = search(db, "red square")
    assert hits[0]["path"] == str(folder / "red.jpg")
    assert len(hits) == 3 and hits[0]["score"] > hits[1]["score"]  # OR: the other squares still rank, lower
    assert set(hits[0]) >= {"path", "score", "caption", "tags"} and "red" in hits[0]["tags"]
    assert hits[0]["matched"] == "a red square on a plain background"
    assert search(db, "boxes")[0]["matched"].startswith("two")  # the n-best captions are searched too
    assert search(db, "red square", mode="and") == search(db, "red square")[:1]
    assert len(search(db, "square", limit=2)) == 2
    nasty = ['"red', 'red*', 'NEAR(red green)', 'red AND', 'OR green', 'NOT', '-', ' - blue', '(red',
             'green)', 'caption:red', 'tags: blue', "''", 'red^2', '{red}', '\\', 'red"green', 'é ü']
    for q in nasty:
        result = search(db, q)  # never an FTS5 syntax error
        assert isinstance(result, list)
    assert search(db, "caption:red")[0]["path"] == str(folder / "red.jpg")
    assert search(db, 'NEAR(blue "')[0]["path"].endswith("blue.JPEG")
    assert search(db, "-") == [] and search(db, "  ") == []
    assert fts_query('dog AND "cat" NOT*') == '"dog" OR "cat"'  # operators are words, here stop words
    assert fts_query('dog AND "cat" NOT*', "or-all") == '"dog" OR "and" OR "cat" OR "not"'
    assert fts_query("dog (cat)", "and") == '"dog" AND "cat"'


def test_bad_library_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.sqlite: no such library"):
        search(tmp_path / "missing.sqlite", "dog")
    assert not (tmp_path / "missing.sqlite").exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(ValueError, match="junk.sqlite: not an SQLite database"):
        tags(junk)
    with pytest.raises(ValueError, match="junk.sqlite: not an SQLite database"):
        index_folder(tmp_path, junk, ColourCaptioner(), progress=False)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="other.sqlite: not a captioner library"):
        search(other, "dog")
    with pytest.raises(NotADirectoryError, match="nowhere: not a folder"):
        index_folder(tmp_path / "nowhere", tmp_path / "lib.sqlite", ColourCaptioner())


def test_cli_search_and_tags(folder, tmp_path, capsys):
    db = tmp_path / "lib.sqlite"
    index_folder(folder, db, ColourCaptioner(), progress=False)
    assert cli.main(["search", "green square", "--db", str(db), "--json", "--limit", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and out[0]["path"] == str(folder / "green.png") and {"path", "score", "caption"} <= set(out[0])
    assert cli.main(["search", "green", "--db", str(db)]) == 0
    assert "green.png" in capsys.readouterr().out
    assert cli.main(["tags", "--db", str(db), "--json"]) == 0
    assert dict(json.loads(capsys.readouterr().out))["square"] == 3
    assert cli.main(["search", "dog", "--db", str(tmp_path / "none.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.sqlite" in err


# --- real photos, real model --------------------------------------------------------------

PHOTOS = ["101654506_8eb26cfb60",   # dog running through snow
          "110595925_f3395c8bd6",   # cyclist on a road
          "1222322358_225067636e",  # boy on a swing
          "140526326_da07305c1c",   # rock climber
          "2003663004_5b70920a98",  # football player
          "1280147517_98767ca3b3",  # boat on a lake
          "109202756_b97fcdc62c",   # woman riding a horse
          "3027850131_a7772e0ba0"]  # surfer on a wave


@pytest.fixture(scope="module")
def real_captioner(model_path):
    from captioner.apps.api import Captioner
    return Captioner.load(model_path)


@pytest.mark.slow
def test_search_real_photos(flickr8k_root, real_captioner, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(flickr8k_root / "images" / f"{name}.jpg", folder / f"{name}.jpg")
    db = tmp_path / "lib.sqlite"
    s = index_folder(folder, db, real_captioner, progress=False)
    assert (s["captioned"], s["failed"]) == (len(PHOTOS), 0)
    with sqlite3.connect(db) as con:
        stored = con.execute("SELECT path, caption, nbest FROM images").fetchall()
    # every indexed word of each image (its n-best captions are searched too), plural-folded
    vocab = {p: {lemma(w) for a in json.loads(n) for w in words(a["caption"])} for p, _, n in stored}
    distinct = {}
    for path, caption, _ in stored:
        others = set().union(*(v for q, v in vocab.items() if q != path))
        own = [w for w in words(caption) if w not in STOP_WORDS and lemma(w) not in others]
        if own:
            distinct[path] = (caption, own)
    assert len(distinct) >= 2, f"too few images with a word of their own in the caption: {stored}"
    for path, (caption, own) in distinct.items():
        # the whole generated caption, and just its distinctive words, find that image first
        assert search(db, caption)[0]["path"] == path, (caption, search(db, caption)[:2])
        assert search(db, " ".join(own))[0]["path"] == path, (own, search(db, " ".join(own))[:2])
    assert sum(n for _, n in tags(db)) >= len(PHOTOS)
