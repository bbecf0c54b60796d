"""The bad-input corpus: hostile or broken images, caption files, HTML pages, checkpoints, runs and HTTP
requests, every one made here by code. Each case asserts its exact outcome: a one-line error naming the
item, the rest processed, nothing overwritten.

Most cases use stand-in captioners that run the real `load_image`, so they need neither the model nor the
Flickr8k photos; the few that need the shipped model skip without it (and fail under CI).
"""
import csv
import io
import json
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from captioner.apps import cli
from captioner.apps.alttext import fill_alt_text
from captioner.apps.api import CaptionResult, Captioner
from captioner.apps.library import find_images, index_folder
from captioner.apps.server import create_app
from captioner.checkpoint import load_checkpoint, read_header, save_checkpoint
from captioner.config import Config
from captioner.data.datasets import prepare
from captioner.data.images import DECODE_SIDE, ImageError, load_image
from captioner.data.vocab import Vocabulary
from captioner.model import ShowAttendTell
from captioner.train import load_state, save_state, train

LOCAL = "http://127.0.0.1:8000"
SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- making bad inputs ---------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(size=(64, 48), colour=(200, 40, 40)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = colour
    arr[: size[1] // 2, : size[0] // 2] = (20, 20, 200)  # some structure, so JPEG is not trivial
    return Image.fromarray(arr)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def gif_canvas_bomb(side: int = 7900) -> bytes:
    """About 35 bytes: a GIF whose logical screen is side x side pixels around a 1x1 frame."""
    return (b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00;")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def result(caption: str) -> CaptionResult:
    return CaptionResult(caption=caption, score=-1.0, tokens=caption.split(),
                         alternatives=[{"caption": caption, "score": -1.0}])


class LoadingCaptioner:
    """Stands in for Captioner: loads every item with the real load_image, captions it by its size."""
    info = {"name": "stand-in", "path": "/home/someone/models/stand-in.safetensors", "encoder": "lite2",
            "grid": [9, 9]}

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.seen = gate, []

    def caption_batch(self, images, *, beam_size=None, n_best=1, attention=False):
        if self.gate is not None:
            assert self.gate.wait(30)
        out = []
        for src in images:
            self.seen.append(src)
            try:
                img = load_image(src, name=str(src) if isinstance(src, (str, Path)) else None)
            except ImageError as e:
                out.append(e)
                continue
            out.append(result(f"a picture {img.width} wide"))
        return out


def one_line_naming(message: str, name) -> bool:
    return "\n" not in message and str(name) in message


# --- images --------------------------------------------------------------------------------------

def _image_cases(tmp: Path):
    """(kind, source, words the ImageError must contain); the error must also name the source."""
    good = encode(photo(), "JPEG")
    (tmp / "empty.jpg").write_bytes(b"")
    (tmp / "text.jpg").write_text("this is not a picture\n")
    (tmp / "cut.jpg").write_bytes(good[: len(good) // 2])
    (tmp / "folder.jpg").mkdir()
    os.symlink("loop.jpg", tmp / "loop.jpg")
    os.symlink(tmp / "gone.jpg", tmp / "dangling.jpg")
    (tmp / "canvas.gif").write_bytes(gif_canvas_bomb())
    (tmp / "huge.png").write_bytes(png_declaring(7900, 7900))
    (tmp / "giant.png").write_bytes(png_declaring(30000, 30000))
    (tmp / "html.png").write_bytes(b"<!DOCTYPE html><html><body>hi</body></html>")
    return [
        ("empty file", tmp / "empty.jpg", "empty file (0 bytes)"),
        ("text named .jpg", tmp / "text.jpg", "not an image"),
        ("truncated JPEG", tmp / "cut.jpg", "truncated or corrupt"),
        ("directory named x.jpg", tmp / "folder.jpg", "is a directory"),
        ("symlink loop", tmp / "loop.jpg", "too many levels of symbolic links"),
        ("dangling symlink", tmp / "dangling.jpg", "file not found"),
        ("39-byte GIF declaring 7900x7900", tmp / "canvas.gif", "decompression bomb"),
        ("PNG declaring 7900x7900 with 64 bytes of data", tmp / "huge.png", "decompression bomb"),
        ("PNG declaring 900 megapixels", tmp / "giant.png", "too many pixels"),
        ("HTML named .png", tmp / "html.png", "not an image"),
        ("missing file", tmp / "absent.jpg", "file not found"),
    ]


IMAGE_KINDS = [
    "empty file", "text named .jpg", "truncated JPEG", "directory named x.jpg", "symlink loop", "dangling symlink",
    "39-byte GIF declaring 7900x7900", "PNG declaring 7900x7900 with 64 bytes of data", "PNG declaring 900 megapixels",
    "HTML named .png", "missing file"]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_bad_image_file_is_one_line_error_naming_it(kind, tmp_path):
    cases = {k: (src, words) for k, src, words in _image_cases(tmp_path)}
    src, words = cases[kind]
    with pytest.raises(ImageError) as e:
        load_image(src)
    message = str(e.value)
    assert message.startswith(f"{src}: ") and "\n" not in message
    assert words in message.lower(), message


@pytest.mark.parametrize("kind, src, words", [
    ("empty bytes", b"", "<bytes>: empty"),
    ("None", None, "<NoneType>: a NoneType is not an image"),
    ("an int", 3, "<int>: a int is not an image"),
    ("a float array", np.zeros((8, 8, 3), np.float32), "dtype float32 is not an image"),
    ("a 4-d array", np.zeros((2, 8, 8, 3), np.uint8), "shape (2, 8, 8, 3)"),
    ("a text-mode file", "TEXT", "not bytes (open it with 'rb')"),
])
def test_unsupported_sources_are_image_errors(kind, src, words, tmp_path):
    if isinstance(src, str):
        (tmp_path / "t.txt").write_text("hello")
        src = open(tmp_path / "t.txt")  # noqa: SIM115 - closed below
    try:
        with pytest.raises(ImageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_image(src)
    finally:
        if hasattr(src, "close"):
            src.close()


def test_file_objects_bytesio_and_arrays_are_images(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(encode(photo(), "PNG"))
    with open(path, "rb") as f:
        assert load_image(f).size == (64, 48)
    assert load_image(io.BytesIO(path.read_bytes())).size == (64, 48)
    arr = np.asarray(photo())
    assert np.array_equal(np.asarray(load_image(arr)), arr)
    assert load_image(arr[:, :, 0]).mode == "RGB"  # greyscale HxW


def test_huge_photos_are_reduced_while_decoding():
    big = photo((4000, 3000))
    for fmt in ("JPEG", "PNG"):
        img = load_image(encode(big, fmt), f"big.{fmt.lower()}")
        # the shorter side at least DECODE_SIDE (the encoder still gets its detail), under twice that
        assert DECODE_SIDE <= img.height < 2 * DECODE_SIDE, (fmt, img.size)
        assert abs(img.width / img.height - 4 / 3) < 0.01
    assert load_image(encode(big, "JPEG"), min_side=None).size == (4000, 3000)
    assert load_image(encode(photo((500, 375)), "JPEG")).size == (500, 375)  # Flickr-sized: untouched


def _palette_image(size):
    img = Image.new("P", size, 1)
    img.putpalette([0, 0, 0, 10, 200, 30] * 128)
    return img


@pytest.mark.parametrize("kind, make, fmt, colour", [
    ("1-bit", lambda size: Image.new("1", size, 1), "PNG", (255, 255, 255)),
    ("palette", _palette_image, "PNG", (10, 200, 30)),
    ("palette GIF", _palette_image, "GIF", (10, 200, 30)),
    ("16-bit grey", lambda size: Image.new("I;16", size, 257 * 100), "TIFF", (100, 100, 100)),
    ("greyscale with alpha", lambda size: Image.new("LA", size, (50, 255)), "PNG", (50, 50, 50)),
])
def test_large_images_of_every_mode_are_reduced_with_their_colours(kind, make, fmt, colour):
    """reduce() averages values, so palette indices must become colours first, and it refuses 1- and 16-bit."""
    img = load_image(encode(make((1600, 1200)), fmt), f"big.{fmt.lower()}")
    assert img.size == (800, 600) and img.mode == "RGB"
    assert img.getpixel((400, 300)) == colour


def test_animation_decodes_its_first_frame_only():
    img = load_image(animated_gif(), "anim.gif")
    assert img.size == (16, 16) and img.getpixel((8, 8))[0] > 200  # the red first frame


@pytest.fixture(scope="module")
def real_captioner(model_path):
    return Captioner.load(model_path)


def test_caption_batch_reports_each_bad_item_and_captions_the_rest(real_captioner, tmp_path):
    path = tmp_path / "p.jpg"
    path.write_bytes(encode(photo((120, 90)), "JPEG"))
    (tmp_path / "dir.jpg").mkdir()
    with open(path, "rb") as f:
        items = [None, 3, f, io.BytesIO(path.read_bytes()), np.asarray(photo((120, 90))), str(path),
                 gif_canvas_bomb(), tmp_path / "dir.jpg"]
        out = real_captioner.caption_batch(items)
    assert [type(r).__name__ for r in out] == ["ImageError", "ImageError", "CaptionResult", "CaptionResult",
                                               "CaptionResult", "CaptionResult", "ImageError", "ImageError"]
    assert "NoneType" in str(out[0]) and "int" in str(out[1])
    assert "decompression bomb" in str(out[6]) and str(out[7]) == f"{tmp_path / 'dir.jpg'}: is a directory, not an image file"
    assert out[2].caption == out[3].caption == out[5].caption


# --- folders, names and outputs ------------------------------------------------------------------

def test_unsupported_formats_in_a_folder_are_reported_not_ignored(tmp_path):
    for name in ("a.jpg", "b.jxl", "c.svg", "d.dng", "notes.txt"):
        (tmp_path / name).write_bytes(encode(photo(), "JPEG") if name == "a.jpg" else b"x")
    skipped = []
    assert find_images(tmp_path, skipped) == [tmp_path / "a.jpg"]
    assert [line.split(": ")[0] for line in skipped] == [str(tmp_path / n) for n in ("b.jxl", "c.svg", "d.dng")]
    assert "JPEG XL is not supported" in skipped[0] and "SVG" in skipped[1]
    summary = index_folder(tmp_path, tmp_path / "lib.sqlite", LoadingCaptioner(), progress=False)
    assert summary["captioned"] == 1 and len(summary["skipped"]) == 3


@pytest.fixture
def run_caption(monkeypatch, capsys):
    stand_in = LoadingCaptioner()
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: stand_in))

    def go(*argv):
        rc = cli.main(["caption", *map(str, argv)])
        return rc, *capsys.readouterr()
    return go


def test_caption_text_output_stays_parseable_for_any_file_name(run_caption, tmp_path):
    names = ["plain.png", "tab\there.png", "new\nline.png", 'quote".png']
    for name in names:
        (tmp_path / name).write_bytes(encode(photo(), "PNG"))
    rc, out, err = run_caption(tmp_path)
    assert rc == 0, err
    rows = list(csv.reader(io.StringIO(out), delimiter="\t"))
    assert sorted(r[0] for r in rows) == sorted(str(tmp_path / n) for n in names)
    assert all(r[1] == "a picture 64 wide" for r in rows)
    assert f"{tmp_path / 'plain.png'}\ta picture 64 wide\n" in out  # ordinary names are not quoted


def test_caption_cli_names_each_bad_file_and_captions_the_rest(run_caption, tmp_path):
    (tmp_path / "good.png").write_bytes(encode(photo(), "PNG"))
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "canvas.gif").write_bytes(gif_canvas_bomb())
    (tmp_path / "vector.svg").write_text("<svg/>")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    rc, out, err = run_caption(tmp_path / "good.png", tmp_path / "dir.jpg", tmp_path / "canvas.gif", tmp_path,
                               tmp_path / "loop.jpg")
    assert out.splitlines() == [f"{tmp_path / 'good.png'}\ta picture 64 wide"]
    lines = err.lower().splitlines()  # strerror's capitals vary between systems
    at = str(tmp_path).lower()
    assert f"error: {at}/dir.jpg: no images found (jpg, png, gif, bmp, webp, tif, heic, avif)" in lines  # it is a folder
    assert any(line.startswith(f"error: {at}/canvas.gif: declares 7900x7900") for line in lines)
    assert any(line.startswith(f"skipped {at}/vector.svg: vector images") for line in lines)
    assert f"error: {at}/loop.jpg: too many levels of symbolic links" in lines
    assert rc == 2  # a path that cannot be read at all is a usage problem


@pytest.mark.parametrize("command", ["tags", "search"])
def test_closed_pipe_ends_quietly(command, tmp_path):
    """`captioner tags | head -n 1`: the reader goes away; no BrokenPipeError traceback."""
    fake = ("import captioner.apps.library as lib; "
            "lib.tags = lambda db: [(f'tag{i}', i) for i in range(200000)]; "
            "lib.search = lambda db, q, limit=10: [{'path': f'/p/{i}.jpg', 'score': 1.0, 'caption': 'a dog', "
            "'matched': 'a dog', 'tags': []} for i in range(limit)]; ")
    argv = ["tags", "--db", "x"] if command == "tags" else ["search", "dog", "--db", "x", "--limit", "200000"]
    code = fake + f"import sys; from captioner.apps.cli import main; sys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(60) == 141 and err == "", err


INDEX_WITH_A_STAND_IN = """
import sys, time
from captioner.apps.api import CaptionResult
from captioner.apps.library import index_folder
class StandIn:
    info = {"name": "stand-in"}
    def caption_batch(self, images, **kw):
        time.sleep(0.05)  # long enough for the two processes to overlap
        return [CaptionResult("a small square", -1.0, ["a", "small", "square"]) for _ in images]
index_folder(sys.argv[1], sys.argv[2], StandIn(), progress=False, batch_size=2)
"""


def test_two_indexers_on_one_new_library_both_finish(tmp_path):
    for side in "ab":
        for i in range(8):
            (tmp_path / side).mkdir(exist_ok=True)
            (tmp_path / side / f"{i}.png").write_bytes(encode(photo((8 + i, 8)), "PNG"))
    env = {**os.environ, "PYTHONPATH": SRC}
    for attempt in range(3):  # the race was lost in about 1 of 4 tries
        db = tmp_path / f"lib{attempt}.sqlite"
        procs = [subprocess.Popen([sys.executable, "-c", INDEX_WITH_A_STAND_IN, str(tmp_path / side), str(db)],
                                  stderr=subprocess.PIPE, env=env) for side in "ab"]
        errors = [p.communicate(timeout=120)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        with sqlite3.connect(db) as con:
            assert con.execute("SELECT COUNT(*) FROM images WHERE caption IS NOT NULL").fetchone()[0] == 16


def test_a_library_waits_for_another_writer_to_switch_to_wal(tmp_path):
    # what lost the race above: while another indexer holds the write lock, SQLite refuses the switch to
    # write-ahead logging at once, without the busy timeout
    from captioner.apps.library import _use_wal
    db = tmp_path / "lib.sqlite"
    with closing(sqlite3.connect(db)) as con:
        con.execute("CREATE TABLE t (x)")
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(db, timeout=5).execute("PRAGMA journal_mode=WAL")
    threading.Timer(0.3, other.execute, ["COMMIT"]).start()
    with closing(sqlite3.connect(db, timeout=5)) as con:
        _use_wal(con)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


# --- caption files (prepare) ---------------------------------------------------------------------

def test_caption_over_the_csv_field_limit_is_named_and_the_rest_prepared(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(encode(photo(), "JPEG"))
    lines = ["image,caption,split", "a.jpg,a red square,train", f"b.jpg,{'word ' * 40000},train",
             "b.jpg,a blue square,train"]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    summary = prepare(tmp_path / "captions.csv", tmp_path / "work", min_count=1, progress=False)
    problems = summary["problems"]["first"]
    assert any(p.startswith(f"{tmp_path / 'captions.csv'}:3: field larger than field limit") for p in problems)
    assert summary["splits"]["train"] == {"images": 2, "present": 2, "absent": 0, "captions": 2}


def test_csv_whose_images_are_all_missing_fails_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "captions.csv").write_text("image,caption\nx.jpg,a dog\ny.jpg,a cat\n")
    assert cli.main(["prepare", str(tmp_path / "captions.csv"), "--out", str(tmp_path / "work"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'captions.csv'}: none of the 2 images it names exist")
    assert "\n" not in err and not (tmp_path / "work").exists()


def test_header_only_csv_is_one_line_error(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="no usable captions"):
        prepare(tmp_path / "captions.csv", tmp_path / "work", progress=False)


# --- HTML pages (alt-text) -----------------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    """site/ holds the pages and a.png; private.jpg lies outside it."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "a.png").write_bytes(encode(photo(), "PNG"))
    (tmp_path / "private.jpg").write_bytes(encode(photo((32, 32)), "JPEG"))
    os.symlink(tmp_path / "private.jpg", root / "link.jpg")
    return root


def _fill(folder: Path, body: str, **kw):
    page = folder / "page.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>t</title></head><body>{body}</body></html>")
    stand_in = LoadingCaptioner()
    return fill_alt_text(page, captioner=stand_in, **kw), stand_in


@pytest.mark.parametrize("src", ["../private.jpg", "../../../../../../etc/passwd", "link.jpg",
                                 "sub/../../private.jpg", "%2e%2e/private.jpg"])
def test_alt_text_reads_nothing_outside_the_page_folder(site, src):
    report, stand_in = _fill(site, f'<img src="{src}"> <img src="a.png">')
    assert stand_in.seen == [site / "a.png"]  # the outside file was never opened
    assert report.filled == [("a.png", "A picture 64 wide.")]
    assert report.skipped == [f"{site / 'page.html'}: {src}: outside {site} (pass --root to allow): left alone"]
    assert report.data.count(b"alt=") == 1


def test_alt_text_root_option_widens_the_folder(site):
    report, _ = _fill(site, '<img src="../private.jpg">', root=site.parent)
    assert report.filled == [("../private.jpg", "A picture 32 wide.")]


@pytest.mark.parametrize("tag", ['<img src="a.png" role="presentation" alt="">', '<img src="a.png" role="none">',
                                 '<img src="a.png" aria-hidden="true" alt="">', '<img src="a.png" ARIA-HIDDEN=TRUE>',
                                 '<img src="a.png" role="presentation img">'])
def test_decorative_images_are_left_alone(site, tag):
    report, stand_in = _fill(site, tag)
    assert report.filled == [] and report.decorative == 1 and stand_in.seen == []
    assert tag.encode() in report.data


MARK = 'data-alt-generated="captioner"'  # what alt-text adds after each alt it writes


@pytest.mark.parametrize("element", ["textarea", "title", "xmp", "iframe", "noembed", "noframes", "script", "style"])
def test_img_text_inside_raw_text_elements_is_not_rewritten(site, element):
    body = f'<{element}><img src="a.png"></{element}><img src="a.png">'
    report, _ = _fill(site, body)
    assert len(report.filled) == 1  # only the real image after it
    assert f'<{element}><img src="a.png"></{element}><img alt="A picture 64 wide." {MARK} src="a.png">'.encode() in report.data


def test_img_inside_noscript_is_a_real_image(site):
    report, _ = _fill(site, '<noscript><img src="a.png"></noscript>')
    assert f'<noscript><img alt="A picture 64 wide." {MARK} src="a.png"></noscript>'.encode() in report.data


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_pages_are_filled_and_keep_their_encoding(site, encoding):
    text = '<!DOCTYPE html><html><body><p>Café</p><img src="a.png"></body></html>'
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    page = site / "page.html"
    page.write_bytes(bom + text.encode(encoding))
    report = fill_alt_text(page, page, LoadingCaptioner())
    assert len(report.filled) == 1
    data = page.read_bytes()
    assert data.startswith(bom or text.encode(encoding)[:2])
    assert data.decode("utf-16" if "16" in encoding else "utf-32") .lstrip("\ufeff") == text.replace(
        "<img ", f'<img alt="A picture 64 wide." {MARK} ')


def test_output_onto_a_symlink_writes_its_target(site, tmp_path):
    target = tmp_path / "published.html"
    target.write_text("old")
    os.symlink(target, site / "out.html")
    report, _ = _fill(site, '<img src="a.png">')
    fill_alt_text(site / "page.html", site / "out.html", LoadingCaptioner())
    assert (site / "out.html").is_symlink() and target.read_bytes() == report.data


def test_in_place_output_keeps_the_file_mode(site):
    page = site / "page.html"
    page.write_text('<img src="a.png">')
    page.chmod(0o600)
    fill_alt_text(page, page, LoadingCaptioner())
    assert (page.stat().st_mode & 0o777) == 0o600 and b"alt=" in page.read_bytes()


def test_page_with_a_broken_utf16_body_is_one_line_error(site):
    page = site / "page.html"
    page.write_bytes(b"\xff\xfe<\x00h\x00x")  # ends half-way through a UTF-16 code unit
    with pytest.raises(ValueError, match=r"page.html: starts with a UTF-16-LE byte-order mark but is not valid"):
        fill_alt_text(page, captioner=LoadingCaptioner())


# --- checkpoints ---------------------------------------------------------------------------------

TINY = dict(embed_dim=16, project_dim=16, attention_dim=8, decoder_dim=16)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.safetensors"
    vocab = Vocabulary([*Vocabulary.SPECIALS, "a", "dog"])
    config = Config(**TINY)
    save_checkpoint(path, ShowAttendTell(config, len(vocab)), vocab, config, {"name": "tiny"})
    return path


def _variant(good: Path, out: Path, change) -> Path:
    tensors = load_file(good)
    change(tensors)
    save_file(tensors, out, metadata=read_header(good))
    return out


@pytest.mark.parametrize("kind, change, words", [
    ("NaN weights", lambda t: t["out.weight"].view(-1).__setitem__(3, float("nan")),
     "tensor out.weight holds NaN or infinite values"),
    ("infinite weights", lambda t: t["lstm.bias_hh"].fill_(float("inf")), "tensor lstm.bias_hh holds NaN"),
    ("int8 weights", lambda t: t.__setitem__("embed.weight", t["embed.weight"].to(torch.int8)),
     "tensor embed.weight is int8; expected float16, bfloat16 or float32"),
    ("float64 weights", lambda t: t.__setitem__("out.bias", t["out.bias"].double()), "tensor out.bias is float64"),
    ("wrong shape", lambda t: t.__setitem__("out.bias", torch.zeros(3)), "tensor out.bias has shape [3], the model needs [6]"),
    ("missing tensor", lambda t: t.pop("beta.weight"), "tensor beta.weight is missing"),
    ("extra tensor", lambda t: t.__setitem__("backdoor", torch.zeros(1)), "tensor backdoor is not part of the model"),
])
def test_bad_weights_are_refused_naming_file_and_tensor(tiny_checkpoint, tmp_path, kind, change, words):
    bad = _variant(tiny_checkpoint, tmp_path / "bad.safetensors", change)
    with pytest.raises(ValueError) as e:
        load_checkpoint(bad)
    assert str(e.value).startswith(f"{bad}: ") and words in str(e.value) and "\n" not in str(e.value)


def test_float16_and_bfloat16_weights_load(tiny_checkpoint, tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        ok = _variant(tiny_checkpoint, tmp_path / f"{dtype}.safetensors",
                      lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
        assert load_checkpoint(ok).config == Config(**TINY)


@pytest.mark.parametrize("kind", ["truncated", "pickle", "empty", "json header only"])
def test_unreadable_checkpoint_is_one_line(tiny_checkpoint, tmp_path, kind):
    bad = tmp_path / "bad.safetensors"
    data = tiny_checkpoint.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "pickle": b"\x80\x04\x95" + b"\0" * 40, "empty": b"",
                     "json header only": data[:8 + struct.unpack("<Q", data[:8])[0]]}[kind])
    with pytest.raises(ValueError) as e:
        load_checkpoint(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)


# --- training runs -------------------------------------------------------------------------------

def _finished_run(folder: Path, with_state: bool) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"log.csv": b"epoch,train_loss\n1,3.2\n", "best.safetensors": b"weights", "config.json": b"{}"}
    if with_state:
        files["state.safetensors"] = b"state"
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def _unchanged(folder: Path, files: dict) -> bool:
    return {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_resume_without_a_state_refuses_and_keeps_the_run(tmp_path):
    files = _finished_run(tmp_path / "run", with_state=False)
    with pytest.raises(ValueError) as e:
        train(tmp_path / "work", tmp_path / "run", resume=True, progress=False)
    assert str(e.value) == (f"{tmp_path / 'run' / 'state.safetensors'}: missing, nothing to resume (best.safetensors, "
                            "log.csv would be overwritten); pass --force to start afresh in this folder")
    assert _unchanged(tmp_path / "run", files)


def test_resume_without_a_state_on_real_data_does_not_restart_over_the_run(tiny_workdir, tmp_path):
    """With a workdir that trains, the old code started again at epoch 1 and overwrote log.csv and best."""
    files = _finished_run(tmp_path / "run", with_state=False)
    config = Config(embed_dim=16, project_dim=16, attention_dim=8, decoder_dim=16, epochs=1, batch_size=4,
                    num_workers=0)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_workdir, tmp_path / "run", config, resume=True, progress=False)
    assert _unchanged(tmp_path / "run", files)


def test_resume_of_a_folder_that_does_not_exist_refuses(tmp_path):
    with pytest.raises(ValueError, match="no such run folder to resume"):
        train(tmp_path / "work", tmp_path / "nope", resume=True, progress=False)
    assert not (tmp_path / "nope").exists()


def test_new_run_over_a_finished_one_needs_force(tmp_path):
    files = _finished_run(tmp_path / "run", with_state=False)
    with pytest.raises(ValueError, match=r"already holds a training run \(best.safetensors, log.csv\)"):
        train(tmp_path / "work", tmp_path / "run", progress=False)
    assert _unchanged(tmp_path / "run", files)
    with pytest.raises(ValueError, match="dataset.jsonl"):  # --force goes past the check, to the (absent) data
        train(tmp_path / "work", tmp_path / "run", force=True, progress=False)


def test_cli_resume_refusal_is_one_line(tmp_path, capsys):
    _finished_run(tmp_path / "run", with_state=False)
    assert cli.main(["train", str(tmp_path / "work"), "--out", str(tmp_path / "run"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err and "--force" in err


def test_truncated_training_state_is_one_line_error(tmp_path):
    model = ShowAttendTell(Config(**TINY), 6)
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "state.safetensors"
    save_state(path, model, opt, 0, 6, 0.5, 0, [{"epoch": 1}])
    assert load_state(path, model, opt)["step"] == 6
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as e:
        load_state(path, model, opt)
    assert str(e.value).startswith(f"{path}: damaged training state, cannot resume") and "\n" not in str(e.value)


# --- HTTP requests -------------------------------------------------------------------------------

@pytest.fixture
def app_client():
    stand_in = LoadingCaptioner()
    with TestClient(create_app(stand_in, max_upload_mb=1), base_url=LOCAL) as client:
        yield client


GOOD_PNG = encode(photo(), "PNG")


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example",
                                  "localhost.attacker.example", ""])
def test_foreign_host_header_is_refused(app_client, host):
    """DNS rebinding: a page on attacker.example, its name now pointing at 127.0.0.1, calls the server."""
    for method, url in (("GET", "/api/model"), ("POST", "/api/caption"), ("GET", "/")):
        r = app_client.request(method, url, headers={"host": host}, content=GOOD_PNG if method == "POST" else None)
        assert r.status_code == 421 and "not this server's name" in r.json()["detail"], (method, url)


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "192.168.1.20:8000",
                                  "LOCALHOST"])
def test_own_names_are_served(app_client, host):
    assert app_client.post("/api/caption", content=GOOD_PNG, headers={"host": host}).status_code == 200


def test_allow_host_option_adds_names():
    with TestClient(create_app(LoadingCaptioner(), allow_hosts=["photos.home.arpa"]),
                    base_url="http://photos.home.arpa:8000") as client:
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/health", headers={"host": "other.home.arpa"}).status_code == 421
        # behind a reverse proxy that passes Host 127.0.0.1, the page's origin is the allowed name
        for origin, status in (("https://photos.home.arpa", 200), ("https://other.home.arpa", 403)):
            r = client.post("/api/caption", content=GOOD_PNG, headers={"host": "127.0.0.1:8000", "origin": origin})
            assert r.status_code == status, origin


@pytest.mark.parametrize("origin, status", [("http://attacker.example", 403), ("null", 403),
                                            ("http://127.0.0.1:9999", 403), (LOCAL, 200), (None, 200)])
def test_cross_origin_posts_are_refused(app_client, origin, status):
    headers = {"content-type": "text/plain"} | ({"origin": origin} if origin else {})
    r = app_client.post("/api/caption", content=GOOD_PNG, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert "cross-origin POST" in r.json()["detail"]


def test_no_host_paths_in_model_info(app_client):
    info = app_client.get("/api/model").json()
    assert info["path"] == "stand-in.safetensors" and "/home/" not in json.dumps(info)


@pytest.mark.parametrize("kind, body, status, words", [
    ("39-byte GIF declaring 7900x7900", gif_canvas_bomb(), 422, "canvas.gif: declares 7900x7900 pixels"),
    ("PNG declaring 7900x7900", png_declaring(7900, 7900), 422, "canvas.gif: declares 7900x7900 pixels"),
    ("HTML as an image", b"<html></html>", 422, "canvas.gif: not an image"),
    ("over the upload limit", b"\xff\xd8" + b"\0" * (1024 * 1024 + 70_000), 413, "the limit is 1,048,576 bytes"),
])
def test_bad_uploads_get_4xx_naming_the_problem(app_client, kind, body, status, words):
    r = app_client.post("/api/caption", files={"file": ("canvas.gif", body, "image/gif")})
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_multipart_without_a_file_is_422(app_client):
    r = app_client.post("/api/caption", files={"photo": ("p.png", GOOD_PNG, "image/png")})
    assert r.status_code == 422 and "no file" in r.json()["detail"]


def _hold_one_request(app, client, body: bytes):
    """POST `body` from a thread and return once the server counts it in flight: (thread, [its response])."""
    first = []
    t = threading.Thread(target=lambda: first.append(client.post("/api/caption", content=body)))
    t.start()
    deadline = time.time() + 10
    while not app.state.in_flight.requests and time.time() < deadline:
        time.sleep(0.01)
    return t, first


def test_load_is_shed_with_503_and_retry_after():
    gate = threading.Event()
    app = create_app(LoadingCaptioner(gate), max_pending=1)
    with TestClient(app, base_url=LOCAL) as client:
        t, first = _hold_one_request(app, client, GOOD_PNG)
        shed = client.post("/api/caption", content=GOOD_PNG)
        assert shed.status_code == 503 and shed.headers["retry-after"] == "2"
        assert "server busy: 1 captions in progress" in shed.json()["detail"]
        assert client.get("/api/health").status_code == 200  # the server itself still answers
        gate.set()
        t.join(30)
        assert first[0].status_code == 200
        assert client.post("/api/caption", content=GOOD_PNG).status_code == 200  # and recovers
        assert app.state.in_flight.requests == 0 and app.state.in_flight.bytes == 0


def test_upload_bytes_in_flight_are_bounded():
    gate = threading.Event()
    app = create_app(LoadingCaptioner(gate), max_pending_mb=0.2)
    big = encode(photo((200, 200)), "BMP")  # 120 kB
    with TestClient(app, base_url=LOCAL) as client:
        t, first = _hold_one_request(app, client, big)
        shed = client.post("/api/caption", content=big)
        assert shed.status_code == 503 and "MB of uploads in progress" in shed.json()["detail"]
        gate.set()
        t.join(30)
        assert first[0].status_code == 200


@pytest.fixture
def library(tmp_path):
    """An indexed folder holding a photo and two symlinks out of it: to a secret and to a photo elsewhere."""
    lib, outside = tmp_path / "lib", tmp_path / "outside"
    lib.mkdir(), outside.mkdir()
    (lib / "dog.png").write_bytes(GOOD_PNG)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (outside / "private.png").write_bytes(encode(photo((40, 40)), "PNG"))
    os.symlink(outside / "passwd", lib / "secret.jpg")
    os.symlink(outside / "private.png", lib / "private.png")
    db = tmp_path / "lib.sqlite"
    index_folder(lib, db, LoadingCaptioner(), progress=False)
    return lib, db


def test_library_symlinks_out_of_the_folder_are_not_served(library):
    lib, db = library
    with TestClient(create_app(LoadingCaptioner(), db=db), base_url=LOCAL) as client:
        for name in ("secret.jpg", "private.png"):
            for path in (str(lib / name), f"lib/{name}"):
                r = client.get("/api/library/image", params={"path": path})
                assert r.status_code == 403 and "links outside the library's folder" in r.json()["detail"], path
                assert b"root:" not in r.content
        r = client.get("/api/library/image", params={"path": "lib/dog.png"})
        assert r.status_code == 200 and r.content == GOOD_PNG


def test_library_search_shows_no_host_paths_and_refuses_traversal(library):
    lib, db = library
    with TestClient(create_app(LoadingCaptioner(), db=db), base_url=LOCAL) as client:
        hits = client.get("/api/search", params={"q": "picture"}).json()["results"]
        assert sorted(h["path"] for h in hits) == ["lib/dog.png", "lib/private.png"]
        for path in ("lib/../outside/passwd", "lib/../lib.sqlite", "../outside/private.png", "outside/private.png",
                     "/etc/passwd", "lib"):
            r = client.get("/api/library/image", params={"path": path})
            assert r.status_code == 404 and "not in the library" in r.json()["detail"], path
