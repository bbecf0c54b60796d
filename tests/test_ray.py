"""Scale-out on Ray (apps/scale.py): a local Ray instance captions real Flickr8k dev photos to exactly what
`Captioner.caption_batch` says, and a job cut off halfway (even mid-line) resumes to the same complete file,
without duplicates. One Ray instance for the module: starting Ray takes ~10 s on 2 cores, each job's actors
another ~15 s."""
import json
import os

import pytest

from captioner.apps import scale
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
