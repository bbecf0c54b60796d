"""Photos as people keep them: HEIC/AVIF files, XMP metadata read back by exiftool, streaming captioning,
alt text that says it was generated, and a CLI whose help shows its defaults."""
import argparse
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.apps import cli
from captioner.apps.alttext import fill_alt_text
from captioner.apps.api import Captioner, CaptionResult
from captioner.apps.library import find_images
from captioner.apps.metadata import sidecar_path, write_sidecar
from captioner.data.images import ImageError, load_image

# HEIC photos made once with pillow-heif (whose wheel carries a GPL encoder, so it is no dependency here):
# photo() at 96x64 and 320x240, and photo() turned on its side with EXIF orientation 6
DATA = Path(__file__).resolve().parent / "data"


def photo(size=(96, 64)) -> Image.Image:
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return Image.fromarray(np.stack([x * 2 % 256, y * 3 % 256, (x + y) % 256], -1).astype(np.uint8))


class StandIn:
    """Captions an image by its width with the real load_image: no model needed."""
    info = {"name": "stand-in"}
    caption_iter = Captioner.caption_iter  # the real chunking, over this caption_batch

    def __init__(self):
        self.batches = []

    def caption_batch(self, images, *, beam_size=None, n_best=1, attention=False):
        self.batches.append(len(images))
        out = []
        for src in images:
            try:
                img = load_image(src)
            except ImageError as e:
                out.append(e)
                continue
            text = f"a dog on grass {img.width} wide"
            out.append(CaptionResult(text, -1.0, text.split(), concepts=[{"word": "dog", "p": 0.9}],
                                     confidence=img.width / 1000))
        return out


@pytest.fixture(scope="module")
def exiftool():
    """Debian's exiftool, the reader photo managers agree with; missing: fail under CI, else skip."""
    exe = shutil.which("exiftool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("exiftool missing (apt install libimage-exiftool-perl; required when CI is set)")
        pytest.skip("exiftool missing (apt install libimage-exiftool-perl)")
    return lambda *args: json.loads(subprocess.run([exe, "-j", "-G1", *map(str, args)], capture_output=True,
                                                   text=True, check=True).stdout)


# --- formats -------------------------------------------------------------------------------------

def test_heic_and_avif_photos_are_read_and_found_in_folders(tmp_path):
    img = photo()
    shutil.copy(DATA / "photo.heic", tmp_path / "a.heic")
    shutil.copy(DATA / "photo.heic", tmp_path / "b.HEIF")
    img.save(tmp_path / "c.avif", quality=95)
    for name in ("a.heic", "b.HEIF", "c.avif"):
        got = np.asarray(load_image(tmp_path / name), dtype=np.int16)
        assert got.shape == (64, 96, 3)
        assert np.abs(got - np.asarray(img)).mean() < 8, name  # lossy, but the same picture
    assert find_images(tmp_path) == [tmp_path / n for n in ("a.heic", "b.HEIF", "c.avif")]


def test_heic_rotation_is_applied_once(tmp_path):
    """libheif applies the stored rotation while decoding; it must not be applied again from EXIF."""
    assert load_image(DATA / "sideways.heic").size == (96, 64)


def test_a_heic_photo_captions_like_its_png(tmp_path, model_path):
    captioner = Captioner.load(model_path)
    shutil.copy(DATA / "photo-320x240.heic", tmp_path / "p.heic")
    heic = captioner.caption(tmp_path / "p.heic")
    assert heic.source == str(tmp_path / "p.heic") and heic.tokens
    decoded = np.asarray(load_image(tmp_path / "p.heic"))  # what libheif decodes, losslessly re-encoded
    assert heic.caption == captioner.caption(decoded).caption


def test_cli_captions_a_heic_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: StandIn()))
    shutil.copy(DATA / "photo.heic", tmp_path / "photo.heic")
    assert cli.main(["caption", str(tmp_path / "photo.heic")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'photo.heic'}\ta dog on grass 96 wide\n"


# --- the API: every kind of image, streamed --------------------------------------------------------

def test_caption_iter_streams_in_order_in_chunks_with_errors_in_place(tmp_path):
    png = io.BytesIO()
    photo((30, 20)).save(png, format="PNG")
    items = [photo((10 + k, 10)) for k in range(5)] + [object(), png, np.zeros((8, 12, 4), np.uint8),
                                                         np.zeros((8, 14), np.uint8)]
    stand_in = StandIn()
    out = list(stand_in.caption_iter(iter(items), batch_size=4))  # a generator: no length known
    assert stand_in.batches == [4, 4, 1]
    assert [r.caption.split()[-2] if isinstance(r, CaptionResult) else "error" for r in out] == \
        ["10", "11", "12", "13", "14", "error", "30", "12", "14"]
    assert str(out[5]) == "<object>: a object is not an image (expected a path, bytes, a binary file object, " \
                          "a PIL image or an HxWx3 uint8 array)"
    with pytest.raises(ValueError, match="batch_size"):
        list(stand_in.caption_iter(items, batch_size=0))


# --- XMP metadata -----------------------------------------------------------------------------------

def test_tag_writes_sidecars_that_exiftool_reads_and_leaves_photos_alone(tmp_path, monkeypatch, capsys, exiftool):
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: StandIn()))
    photo().save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "bad.jpg").write_bytes(b"not a photo")
    before = (tmp_path / "a.jpg").read_bytes()
    assert cli.main(["tag", str(tmp_path / "a.jpg"), str(tmp_path / "bad.jpg"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'bad.jpg'}: not an image" in err and "1 of 2 photos tagged" in err
    assert (tmp_path / "a.jpg").read_bytes() == before and not sidecar_path(tmp_path / "bad.jpg").exists()
    [meta] = exiftool(sidecar_path(tmp_path / "a.jpg"))
    assert meta["XMP-dc:Description"] == "a dog on grass 96 wide"
    assert meta["XMP-dc:Subject"] == ["dog", "grass", "wide"]  # the concept, then the content words
    assert meta["XMP-captioner:Generated"] == "dc:description dc:subject"
    assert meta["XMP-captioner:Model"] == "stand-in"


def test_existing_sidecar_keeps_a_persons_description_and_keywords(tmp_path, exiftool):
    jpg = tmp_path / "b.jpg"
    photo().save(jpg)
    subprocess.run(["exiftool", "-q", "-o", str(sidecar_path(jpg)), "-XMP-dc:Description=Grandma's garden",
                    "-XMP-dc:Subject=family", "-XMP-xmp:Rating=5", str(jpg)], check=True)
    write_sidecar(jpg, "a dog on grass", ["dog", "grass"], "m1")
    write_sidecar(jpg, "a cat on a sofa", ["cat", "sofa"], "m2")  # a second run replaces only our own tags
    [meta] = exiftool(sidecar_path(jpg))
    assert meta["XMP-dc:Description"] == "Grandma's garden"
    assert meta["XMP-dc:Subject"] == ["family", "cat", "sofa"] and meta["XMP-xmp:Rating"] == 5
    assert meta["XMP-captioner:Generated"] == "dc:subject"
    (tmp_path / "c.jpg.xmp").write_text("<not xml")
    with pytest.raises(ValueError, match=r"c.jpg.xmp: existing sidecar is not valid XML .*: left alone"):
        write_sidecar(tmp_path / "c.jpg", "x", [])


def test_index_write_metadata_sidecars_every_photo(tmp_path, monkeypatch, capsys, exiftool):
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: StandIn()))
    (tmp_path / "pics" / "sub").mkdir(parents=True)
    photo((80, 60)).save(tmp_path / "pics" / "x.png")
    shutil.copy(DATA / "photo.heic", tmp_path / "pics" / "sub" / "y.heic")
    argv = ["index", str(tmp_path / "pics"), "--db", str(tmp_path / "lib.sqlite"), "--write-metadata",
            "--no-progress"]
    assert cli.main(argv) == 0
    assert "metadata written for 2 (XMP sidecars)" in capsys.readouterr().out
    got = {os.path.basename(m["SourceFile"]): m["XMP-dc:Description"]
           for m in exiftool(*sorted((tmp_path / "pics").rglob("*.xmp")))}
    assert got == {"x.png.xmp": "a dog on grass 80 wide", "y.heic.xmp": "a dog on grass 96 wide"}


def test_in_file_writes_the_jpeg_metadata_and_not_its_pixels(tmp_path, monkeypatch, capsys, exiftool):
    monkeypatch.setattr(Captioner, "load", staticmethod(lambda *a, **k: StandIn()))
    jpg = tmp_path / "a.jpg"
    photo().save(jpg, quality=90)
    pixels = np.asarray(Image.open(jpg))
    assert cli.main(["tag", str(jpg), "--in-file", "--no-progress"]) == 0
    assert not sidecar_path(jpg).exists()
    [meta] = exiftool(jpg)
    assert meta["XMP-dc:Description"] == "a dog on grass 96 wide" and "dog" in meta["XMP-dc:Subject"]
    assert np.array_equal(np.asarray(Image.open(jpg)), pixels)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no exiftool: one clear line, nothing captioned
    assert cli.main(["tag", str(jpg), "--in-file"]) == 2
    assert "--in-file needs exiftool" in capsys.readouterr().err


# --- alt text ---------------------------------------------------------------------------------------

def test_alt_text_marks_what_it_wrote_and_leaves_unsure_images_alone(tmp_path):
    photo((500, 10)).save(tmp_path / "wide.png")   # stand-in confidence 0.5
    photo((100, 10)).save(tmp_path / "narrow.png")  # 0.1
    page = tmp_path / "p.html"
    original = b'<p>\xe9<img src="wide.png">\r\n<IMG SRC=narrow.png alt="">'
    page.write_bytes(original)
    report = fill_alt_text(page, None, StandIn(), min_confidence=0.3)
    assert report.data == (b'<p>\xe9<img alt="A dog on grass 500 wide." data-alt-generated="captioner" '
                           b'src="wide.png">\r\n<IMG SRC=narrow.png alt="">')
    assert report.unsure == [f"{tmp_path / 'narrow.png'}: confidence 0.10 is below 0.3 "
                             "('A dog on grass 100 wide.'): left alone"]
    assert page.read_bytes() == original
    with pytest.raises(ValueError, match="min_confidence"):
        fill_alt_text(page, None, StandIn(), min_confidence=2)


# --- CLI --------------------------------------------------------------------------------------------

def test_version_and_defaults_in_every_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("captioner 0.")
    parser = cli.build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        for action in sub._actions:
            if action.help not in (None, argparse.SUPPRESS) and type(action.default) in (int, float, str) \
                    and action.default is not argparse.SUPPRESS:
                line = " ".join(sub.format_help().split())
                assert f"(default: {action.default})" in line, (name, action.option_strings)


def test_one_spelling_per_option():
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    for name in ("caption", "live", "index", "alt-text", "tag"):
        opts = {o for a in subcommands[name]._actions for o in a.option_strings}
        assert {"--model", "--beam", "--backend", "--no-int8", "--plain"} <= opts, name
    args = cli.build_parser().parse_args(["evaluate", "--out", "o", "--max-images", "5"])
    assert args.limit == 5
    assert cli.build_parser().parse_args(["serve", "--batch-size", "4"]).max_batch == 4


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("::1", False), ("[::1]", False),
                                          ("localhost", False), ("0.0.0.0", True), ("192.168.1.5", True),
                                          ("myhost.lan", True)])
def test_serve_warns_when_other_machines_can_reach_it(host, warned):
    from captioner.apps.server import exposure_warning
    message = exposure_warning(host)
    assert (message is not None) == warned
    assert message is None or (message.startswith(f"warning: listening on {host}:") and "\n" not in message)
