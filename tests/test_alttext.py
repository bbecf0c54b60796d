"""Alt text for web pages: only the alt attributes of local images change, every other byte stays put."""
import html
import os

import pytest
from PIL import Image

from captioner.apps import cli
from captioner.apps.alttext import alt_from_caption, fill_alt_text
from captioner.apps.api import CaptionResult


class NameCaptioner:
    """Stands in for captioner.Captioner: captions an image by its pixel colour, errors like the real one."""
    info = {"name": "name-test"}

    def __init__(self, special=None):
        self.seen = []
        self.special = special or {}

    def caption_batch(self, images, *, beam_size=None, n_best=1, attention=False):
        out = []
        for path in images:
            self.seen.append(path)
            try:
                with Image.open(path) as im:
                    r, g, b = im.convert("RGB").getpixel((0, 0))
            except Exception:
                out.append(ValueError(f"{path}: cannot identify image file"))
                continue
            caption = self.special.get(path.name, f"a photo coloured {r} {g} {b}")
            out.append(CaptionResult(caption, -1.0, caption.split()))
        return out


def expected_alt(colour):
    return html.escape(alt_from_caption("a photo coloured %d %d %d" % colour))


# Markers @@n@@ stand where alt attributes are; the input and the expected output are the same template
# with different attribute text, so comparing them whole checks every other byte is untouched.
TEMPLATE = (
    b'<!DOCTYPE html>\r\n<html lang="fr"><head><meta charset="iso-8859-1"><title>Caf\xe9 page</title>\r\n'
    b'<style>img { border: 0 } /* <img src="a.png"> in CSS */</style>\r\n'
    b'<script>var s = \'<img src="a.png">\'; if (a < b && c > d) {}</script></head>\n<body>\n'
    b'<!-- <img src="a.png"> a commented-out image -->\n'
    b'<p>Existing: <img src="a.png" alt="A cat I know">\n'
    b'<p>Missing: <img@@1@@ src="a.png" width=10 height=10>\n'
    b'<p>Empty: <IMG SRC = \'b.png\'   @@2@@ class="x" />\n'
    b'<p>Blank: <img @@3@@ src="sub/c%20d.png">\n'
    b'<p>Valueless: <img src=b.png @@4@@>\n'
    b'<p>Multi\nline: <img\n   src="a.png"\n\t@@5@@/>\n'
    b'<p>Remote: <img src="https://example.com/x.png"> <img src="//cdn.example.com/y.png" alt="">'
    b' <img src="data:image/png;base64,iVBORw0KGgo="> <img src="HTTP://EXAMPLE.COM/Z.PNG">\n'
    b'<p>Missing file: <img src="nope.png"> unreadable: <img src="broken.png" alt="">\n'
    b'<p>No src: <img alt=""> root: <img src="/abs.png">\n'
    b'<div><p>unclosed <b>bold <i>tags</b> & stray < and > signs <img@@6@@ src=b.png></div>\n'
    b'<p>Trailing junk <img src="a.png" alt="kept"\n'
)
ORIGINAL = {1: b"", 2: b'alt=""', 3: b"alt=' '", 4: b"ALT", 5: b'alt = ""', 6: b""}
PIXELS = {"a.png": (10, 20, 30), "b.png": (200, 100, 0), "sub/c d.png": (1, 2, 3)}


def fill(template, attrs):
    for k, v in attrs.items():
        template = template.replace(b"@@%d@@" % k, v)
    return template


@pytest.fixture
def site(tmp_path):
    for name, colour in PIXELS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    page = tmp_path / "page.html"
    page.write_bytes(fill(TEMPLATE, ORIGINAL))
    return page


def test_fills_only_missing_alt_and_keeps_every_other_byte(site, tmp_path):
    cap = NameCaptioner()
    report = fill_alt_text(site, tmp_path / "out.html", cap)
    a, b, c = (expected_alt(PIXELS[n]).encode() for n in ("a.png", "b.png", "sub/c d.png"))
    m = b'" data-alt-generated="captioner"'  # every generated alt is marked as such
    expected = fill(TEMPLATE, {1: b' alt="' + a + m, 2: b'alt="' + b + m, 3: b'alt="' + c + m,
                               4: b'alt="' + b + m, 5: b'alt="' + a + m, 6: b' alt="' + b + m})
    assert report.data == expected
    assert (tmp_path / "out.html").read_bytes() == expected
    assert site.read_bytes() == fill(TEMPLATE, ORIGINAL)  # the input page is not touched
    assert [src for src, _ in report.filled] == ["a.png", "b.png", "sub/c%20d.png", "b.png", "a.png", "b.png"]
    assert report.kept == 1  # "A cat I know"; the trailing unterminated tag is page text, not a tag
    # each distinct file captioned once, remote images never opened
    assert sorted(p.name for p in cap.seen) == ["a.png", "b.png", "broken.png", "c d.png"]
    assert len(report.skipped) == 6 and all(line.startswith(str(site)) for line in report.skipped)
    assert sum("remote" in line for line in report.skipped) == 4
    assert len(report.errors) == 2 and all("\n" not in e for e in report.errors)
    assert any(e.startswith(str(tmp_path / "nope.png")) and "not found" in e for e in report.errors)
    assert any(e.startswith(str(tmp_path / "broken.png") + ": cannot identify") for e in report.errors)


def test_caption_is_escaped_and_ascii(tmp_path):
    Image.new("RGB", (4, 4), (0, 0, 0)).save(tmp_path / "x.png")
    page = tmp_path / "p.html"
    page.write_bytes(b'<p><img src="x.png"></p>')
    cap = NameCaptioner(special={"x.png": 'a "quoted" <b>bold</b> & caf\u00e9 sign'})
    report = fill_alt_text(page, None, cap)
    assert report.data == (b'<p><img alt="A &quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt; &amp; caf&#233; sign." '
                           b'data-alt-generated="captioner" src="x.png"></p>')
    assert html.unescape(report.filled[0][1]) == 'A "quoted" <b>bold</b> & caf\u00e9 sign.'
    assert not (tmp_path / "None").exists()


def test_nothing_to_do_needs_no_captioner_and_in_place(site, tmp_path):
    page = tmp_path / "done.html"
    page.write_bytes(b'<img src="a.png" alt="Already described"><img src="http://x/y.png">')
    report = fill_alt_text(page, page, captioner=None)  # None would load the model: it must not be needed
    assert report.filled == [] and report.kept == 1 and page.read_bytes() == report.data
    original, expected = site.read_bytes(), fill_alt_text(site, None, NameCaptioner()).data
    assert site.read_bytes() == original  # no out_path: nothing written
    fill_alt_text(site, site, NameCaptioner())  # in place, atomically
    assert site.read_bytes() == expected != original
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_missing_page_is_one_line_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nothing.html: cannot read page"):
        fill_alt_text(tmp_path / "nothing.html", None, NameCaptioner())
    assert cli.main(["alt-text", str(tmp_path / "nothing.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing.html" in err


@pytest.mark.slow
def test_cli_with_real_model(site, tmp_path, capsysbinary, model_path):
    assert cli.main(["alt-text", str(site)]) == 0
    captured = capsysbinary.readouterr()
    out = captured.out
    # left empty: the protocol-relative remote image, the unreadable file and the img without src
    assert out.startswith(b"<!DOCTYPE html>") and out.count(b'alt=""') == 3
    assert b"6 alt texts filled" in captured.err and b"broken.png" in captured.err
    # outside the alt attributes the page is unchanged: strip them from both and compare
    import re
    strip = lambda b: re.sub(rb"""\s*\b(alt|data-alt-generated)(\s*=\s*("[^"]*"|'[^']*'|[^\s>]*))?(?=[\s/>])""", b"",
                             b, flags=re.I)
    assert strip(out) == strip(site.read_bytes())
