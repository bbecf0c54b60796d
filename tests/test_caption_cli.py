"""`captioner caption`: files, folders and globs in; text, JSON or CSV out; bad files reported, not fatal."""
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bomb
from PIL import Image

from captioner.apps import cli
from captioner.apps.api import Captioner

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def captioner(model_path):
    return Captioner.load(model_path)


@pytest.fixture
def run(captioner, monkeypatch, capsys):
    """Run `captioner caption ARGS` through cli.main with the module's model, so it loads only once."""
    loads = []

    def load(path=None, *, runtime="auto", backend="auto", beam_size=3, max_len=30, int8=True, grounded=True):
        loads.append({"path": path, "backend": backend, "beam_size": beam_size, "int8": int8, "grounded": grounded})
        return captioner
    monkeypatch.setattr(Captioner, "load", staticmethod(load))

    def go(*argv):
        rc = cli.main(["caption", *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err
    go.loads = loads
    return go


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def photo(seed=0, size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([x * 2 + seed * 40, y * 2, (x + y) % 256], -1).astype(np.uint8)
    arr[10:40, 20:60] = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def text_lines(out: str) -> dict[str, str]:
    return dict(line.split("\t", 1) for line in out.splitlines())


def test_text_output_matches_the_api(run, captioner, tmp_path):
    a = save(photo(0), tmp_path / "a.jpg")
    b = save(photo(1), tmp_path / "b.png")
    rc, out, err = run(a, b, "--beam", 2, "--backend", "torch")
    assert rc == 0, err
    assert text_lines(out) == {str(a): captioner.caption(a, beam_size=2).text,
                               str(b): captioner.caption(b, beam_size=2).text}
    assert run.loads[-1] == {"path": None, "backend": "torch", "beam_size": 2, "int8": True, "grounded": True}
    run(a, "--no-int8", "--plain")
    assert run.loads[-1]["int8"] is False and run.loads[-1]["grounded"] is False


def test_json_with_n_best(run, captioner, tmp_path):
    a = save(photo(2), tmp_path / "a.jpg")
    rc, out, _ = run(a, "--json", "--n-best", 3)
    assert rc == 0
    [row] = json.loads(out)
    expected = captioner.caption(a, n_best=3)
    assert row["path"] == str(a) and row["caption"] == expected.caption and row["text"] == expected.text
    assert row["confidence"] == expected.confidence and row["concepts"] == expected.concepts
    assert row["score"] == pytest.approx(expected.score)
    assert row["alternatives"] == expected.alternatives and len(row["alternatives"]) == 3
    rc, out, _ = run(a, "--json")
    assert len(json.loads(out)[0]["alternatives"]) == 1


def test_csv_output(run, captioner, tmp_path):
    a = save(photo(3), tmp_path / "with, comma.jpg")  # the csv module must quote it
    rc, out, _ = run(a, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == 1
    expected = captioner.caption(a)
    assert rows[0]["path"] == str(a) and rows[0]["caption"] == expected.caption and rows[0]["text"] == expected.text
    assert rows[0]["tags"] == " ".join(c["word"].replace(" ", "_") for c in expected.concepts)
    rc, out, _ = run(a, "--csv", "--n-best", 2)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert [r["caption"] for r in rows] == [x["caption"] for x in captioner.caption(a, n_best=2).alternatives]


def test_folders_recurse_and_globs_are_expanded(run, tmp_path):
    files = [save(photo(i), tmp_path / "album" / sub / f"p{i}.jpg") for i, sub in enumerate(["", "x", "x/y"])]
    (tmp_path / "album" / "notes.txt").write_text("not a photo")
    (tmp_path / "album" / ".hidden.jpg").write_bytes(b"")  # hidden files are skipped in folders
    rc, out, err = run(tmp_path / "album")
    assert rc == 0, err
    assert sorted(text_lines(out)) == sorted(map(str, files))
    rc, out, _ = run(f"{tmp_path}/album/**/*.jpg", files[0])  # a quoted glob, plus a duplicate
    assert rc == 0 and sorted(text_lines(out)) == sorted(map(str, files))
    assert len(out.splitlines()) == 3


def test_bad_files_are_reported_and_the_rest_captioned(run, tmp_path):
    good = save(photo(4), tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG\n")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    rc, out, err = run(tmp_path)
    assert rc == 1
    assert list(text_lines(out)) == [str(good)]
    lines = err.splitlines()
    assert f"error: {tmp_path / 'empty.jpg'}: empty file (0 bytes)" in lines
    assert any(x.startswith(f"error: {tmp_path / 'text.jpg'}: not an image") for x in lines)
    assert any(x.startswith(f"error: {tmp_path / 'truncated.jpg'}: truncated or corrupt") for x in lines)
    assert "1 of 4 images captioned, 3 failed" in err




def test_decompression_bomb_is_refused(run, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    rc, out, err = run(tmp_path / "bomb.png")
    assert rc == 1 and out == ""
    assert err.startswith(f"error: {tmp_path / 'bomb.png'}: ") and "pixels" in err
    assert len(err.splitlines()) == 1


def test_unusual_valid_images_are_all_captioned(run, tmp_path):
    base = photo(5)
    grey = np.asarray(base.convert("L"))
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    frames = [base.quantize(32), Image.new("RGB", base.size, "green").quantize(32)]
    exif = Image.Exif()
    exif[0x0112] = 6
    made = [
        save(rgba, tmp_path / "alpha.png"),
        save(Image.fromarray(grey.astype(np.uint16) * 257), tmp_path / "deep16.png"),
        save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:]),
        save(base.convert("CMYK"), tmp_path / "cmyk.jpg"),
        save(base.convert("L"), tmp_path / "grey.jpg"),
        save(base, tmp_path / "rotated.jpg", exif=exif.tobytes()),
        save(Image.new("RGB", (1, 1), "red"), tmp_path / "tiny.png"),
    ]
    rc, out, err = run(tmp_path, "--json")
    assert rc == 0, err
    rows = {r["path"]: r for r in json.loads(out)}
    assert sorted(rows) == sorted(map(str, made))
    assert all(r["caption"] and np.isfinite(r["score"]) for r in rows.values())


def test_usage_errors_exit_2_but_good_paths_are_still_captioned(run, tmp_path):
    good = save(photo(6), tmp_path / "good.jpg")
    (tmp_path / "empty_dir").mkdir()
    rc, out, err = run(tmp_path / "nope.jpg", tmp_path / "empty_dir", good, f"{tmp_path}/*.webp")
    assert rc == 2
    assert list(text_lines(out)) == [str(good)]
    assert f"error: {tmp_path / 'nope.jpg'}: no such file or folder" in err
    assert f"error: {tmp_path / 'empty_dir'}: no images found" in err
    assert f"error: {tmp_path}/*.webp: no file matches" in err


def test_nothing_to_caption_is_a_usage_error(run, tmp_path):
    rc, out, err = run(tmp_path / "nope.jpg")
    assert rc == 2 and out == ""
    assert err.splitlines()[-1] == "error: no images to caption"
    assert run.loads == []  # no time spent loading a model
    rc, _, err = run(tmp_path, "--n-best", 5, "--beam", 3)
    assert rc == 2 and "--n-best" in err


def test_attention_pngs(run, captioner, tmp_path):
    a = save(photo(7), tmp_path / "one" / "same.jpg")
    b = save(photo(8), tmp_path / "two" / "same.png")  # same stem: both must be kept
    rc, out, err = run(a, b, "--attention", tmp_path / "maps")
    assert rc == 0, err
    pngs = sorted((tmp_path / "maps").iterdir())
    assert [p.name for p in pngs] == ["same-2.png", "same.png"]
    for p, src in zip(pngs, [b, a]):
        panels = len(captioner.caption(src).tokens) + 1  # the photo, then one overlay per word
        with Image.open(p) as im:  # panels are 1.8 inches at 72 dpi, six to a row
            assert im.format == "PNG" and im.width >= min(6, panels) * 120


def test_progress_bar_only_for_many_images(run, tmp_path):
    for i in range(21):
        save(Image.new("RGB", (8, 8), (i * 10, 0, 0)), tmp_path / f"{i:02d}.png")
    rc, out, err = run(tmp_path, "--batch-size", 8)
    assert rc == 0 and len(out.splitlines()) == 21
    assert "21/21" in err  # tqdm's counter on stderr
    rc, _, err = run(tmp_path, "--no-progress")
    assert rc == 0 and err == ""


def test_missing_model_is_one_line(tmp_path, capsys):
    img = save(photo(9), tmp_path / "a.jpg")
    rc = cli.main(["caption", str(img), "--model", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {tmp_path / 'missing.safetensors'}: no such checkpoint file\n"


def test_shipped_examples_caption_end_to_end(model_path, tmp_path, capsys):
    """The real command, model loading included, on the example photos shipped in examples/."""
    photos = sorted(p for p in EXAMPLES.iterdir() if p.suffix == ".jpg")
    assert 4 <= len(photos) <= 6 and all(p.stat().st_size < 150_000 for p in photos)
    copy = shutil.copytree(EXAMPLES, tmp_path / "examples")
    rc = cli.main(["caption", str(copy), "--model", str(model_path), "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in rows] == [p.name for p in photos]
    assert all(r["caption"] for r in rows)
