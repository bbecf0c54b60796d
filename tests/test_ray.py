"""Scale-out on Ray (apps/scale.py): a local Ray instance captions real Flickr8k dev photos to exactly what
`Captioner.caption_batch` says, and a job cut off halfway (even mid-line) resumes to the same complete file,
without duplicates. One Ray instance for the module: starting Ray takes ~10 s on 2 cores, each job's actors
another ~15 s."""
import json
import os
import sqlite3

import pytest

from captioner.apps import library, scale
from captioner.apps.api import Captioner
from captioner.apps.cli import main

ray = pytest.importorskip("ray")  # requirements.txt pins it, so CI runs these


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(flickr8k_root, tmp_path_factory):
    """20 dev photos (links to the shared files) and one damaged file."""
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:20]
    d = tmp_path_factory.mktemp("photos")
    for n in names:
        os.symlink(flickr8k_root / "images" / n, d / n)
    (d / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def test_ray_job_killed_halfway_resumes_to_the_single_process_captions(local_ray, folder, model_path, tmp_path,
                                                                        capsys):
    photos = sorted(str(p) for p in folder.iterdir() if p.name != "zz-broken.jpg")
    out = tmp_path / "results.jsonl"
    first = scale.caption_to_jsonl(photos, out, model=str(model_path), limit=8, progress=False)
    assert first == {"written": 8, "skipped": 0, "failed": 0, "todo": 8}
    with open(out, "a") as f:  # killed while writing a record
        f.write('{"path": "' + photos[9][:20])

    # the rerun, through the CLI: skips the 8 written, cuts the half line, reports the broken file and goes on
    rc = main(["caption", str(folder), "--ray", "--out", str(out), "--model", str(model_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "zz-broken.jpg: " in err and "12 written, 8 already there, 1 failed" in err

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == photos  # complete, no duplicates, no broken line
    captioner = Captioner.load(model_path)
    # `captioner caption`'s batches of 16 (the decoder's last digits depend a little on the batch)
    expected = captioner.caption_batch(photos[:16]) + captioner.caption_batch(photos[16:])
    for r in records:
        e = expected[photos.index(r["path"])].to_dict()
        assert {k: r[k] for k in ("text", "caption", "confidence", "concepts", "score")} == \
            {k: e[k] for k in ("text", "caption", "confidence", "concepts", "score")}
        assert r["model"] == captioner.info["name"]

    # a third run has nothing to do and starts no workers
    assert scale.caption_to_jsonl(photos, out, progress=False) == {"written": 0, "skipped": 20, "failed": 0,
                                                                    "todo": 0}


@pytest.fixture()
def few_photos(flickr8k_root, tmp_path):
    """6 dev photos and a damaged file: 4 batches of 2, the last the damaged file alone."""
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[20:26]
    d = tmp_path / "few"
    d.mkdir()
    for n in names:
        os.symlink(flickr8k_root / "images" / n, d / n)
    (d / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def _rows(db) -> dict:
    """Each file's stored row, less the time it was captioned."""
    with sqlite3.connect(db) as con:
        return {r[0]: r[1:] for r in con.execute(
            "SELECT path, size, mtime_ns, sha256, caption, nbest, tags, model, error FROM images")}


def test_index_on_ray_makes_the_single_process_library_and_resumes(local_ray, few_photos, model_path, tmp_path,
                                                                  monkeypatch, capsys):
    common = ["index", str(few_photos), "--model", str(model_path), "--batch-size", "2", "--no-progress"]
    assert main(common + ["--db", str(tmp_path / "one.sqlite")]) == 0

    # a --ray run killed once the first batch is stored
    real = scale.run_batches

    def killed_after_one_batch(*args, **kwargs):
        rows = real(*args, **kwargs)
        yield next(rows)
        rows.close()
        raise KeyboardInterrupt

    ray_db = tmp_path / "ray.sqlite"
    ray_cmd = common + ["--db", str(ray_db), "--ray", "--workers", "2"]
    monkeypatch.setattr(scale, "run_batches", killed_after_one_batch)
    assert main(ray_cmd) == 130
    assert 1 <= len(_rows(ray_db)) < 7
    monkeypatch.undo()

    broken_done = str(few_photos / "zz-broken.jpg") in _rows(ray_db)  # its batch may have been the first back
    capsys.readouterr()
    assert main(ray_cmd) == 0  # the rerun finishes the rest, reporting the broken file in one line if it tried it
    err = capsys.readouterr().err
    assert err.count("skipped ") == (0 if broken_done else 1)  # (Ray Data logs its own lines too)
    assert broken_done or "zz-broken.jpg: " in err

    one, on_ray = _rows(tmp_path / "one.sqlite"), _rows(ray_db)
    assert sorted(on_ray) == sorted(one) and len(one) == 7
    assert on_ray == one  # descriptions, n-best, tags, hashes, model and the broken file's error
    assert one[str(few_photos / "zz-broken.jpg")][3] is None  # no caption, an error
    for query in ("dog running on grass", "a man in a red shirt", "children playing", "water"):
        assert library.search(ray_db, query) == library.search(tmp_path / "one.sqlite", query)
    assert library.tags(ray_db) == library.tags(tmp_path / "one.sqlite")

    # a third run has nothing to send to Ray
    monkeypatch.setattr(scale, "run_batches", lambda *a, **k: pytest.fail("Ray started with nothing to do"))
    assert main(ray_cmd) == 0
    assert "0 captioned, 7 unchanged" in capsys.readouterr().out


def test_output_that_is_not_a_caption_file_is_left_alone(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    with pytest.raises(ValueError, match="notes.jsonl: line 1 is not a caption record"):
        scale.read_done(out)
    assert out.read_text() == "my notes\n"


def test_uri_folders_are_listed_like_local_ones(folder):
    listed = scale.list_uri_images(f"file://{folder}")
    assert len(listed) == 21 and listed[0] == f"file://{sorted(folder.iterdir())[0]}"
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        scale.list_uri_images(f"file://{folder}/missing")
