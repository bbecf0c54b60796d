"""Fill missing alt text of <img> tags in an HTML page with generated captions.

Only the bytes of alt attributes change: html.parser finds the <img> start tags and their positions, a small
tokenizer (the same attribute grammar html.parser uses) finds the alt attribute's span inside the raw tag,
and everything else in the page is copied through byte for byte. The page is decoded as UTF-8 with
surrogateescape, so pages in other ASCII-compatible encodings round-trip exactly too (a UTF-16 or UTF-32
byte-order mark selects that encoding instead, and the page is written back in it); inserted text is
HTML-escaped and written as pure ASCII (character references for anything else) for the same reason.

Rules: an alt attribute that is missing, empty or only whitespace gets the caption; existing alt text is
left alone; only images whose src is a local file relative to the page and inside its folder (or `root`)
are captioned (http(s), data:, protocol-relative //host, other schemes and paths that lead out of the
folder, symlinks included, are skipped); images marked decorative (role="presentation" or "none",
aria-hidden="true") are left alone; <img> text inside raw-text elements (<textarea>, <title>, <xmp>,
<iframe>, <noembed>, <noframes>, <plaintext>, as well as <script> and <style>) is text, not an image, and is
never touched; an image that is missing or cannot be read is reported (one line naming the file) and its
tag left untouched. Each alt text written carries data-alt-generated="captioner", so people and tools can tell
it from a person's and review it; with a minimum confidence, images whose description is less certain are left
without one and reported instead.
"""
from __future__ import annotations

import codecs
import html
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tqdm import tqdm

from captioner.apps.library import error_line
from captioner.io import atomic_write_bytes

# The attribute grammar of html.parser's tolerant start-tag parsing, so our spans agree with its attrs.
_NAME = r"<[a-zA-Z][^\t\n\r\f />\x00]*"
_TAG_NAME = re.compile(_NAME + r"(?:\s|/(?!>))*")
_ATTR = re.compile(r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*""")


@dataclass
class AltTextReport:
    data: bytes                                                  # the page after filling, bytes as written
    filled: list[tuple[str, str]] = field(default_factory=list)  # (src, alt text inserted)
    kept: int = 0                                                # images that already had alt text
    decorative: int = 0                                          # marked decorative: left alone
    skipped: list[str] = field(default_factory=list)             # remote or src-less images, one line each
    errors: list[str] = field(default_factory=list)              # unreadable images, one line each naming the file
    unsure: list[str] = field(default_factory=list)              # below min_confidence: left alone, one line each


class _ImgFinder(HTMLParser):
    """Collects (offset of '<', raw start tag text, attrs) of every <img> tag, in document order."""

    # Elements whose content browsers read as text up to their end tag (raw text and escapable raw text):
    # an "<img>" inside them is not an image. html.parser only knows script and style by itself.
    CDATA_CONTENT_ELEMENTS = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes",
                              "plaintext")

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        # getpos() is (line, column) with lines split on "\n" only, so offsets are computed the same way
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.imgs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            line, col = self.getpos()
            self.imgs.append((self.line_starts[line - 1] + col, self.get_starttag_text(), attrs))

    handle_startendtag = handle_starttag


def _alt_span(raw: str) -> tuple[int, int] | None | bool:
    """Where the first alt attribute sits in a raw start tag: (start, end) of `alt=...`, None if the tag
    has no alt attribute, False if the tag could not be tokenized with confidence."""
    m = _TAG_NAME.match(raw)
    if not m:
        return False
    k = m.end()
    while k < len(raw):
        a = _ATTR.match(raw, k)
        if not a or a.end() == k:
            break
        if a.group(1).lower() == "alt":
            return a.start(1), (a.end(3) if a.group(3) is not None else a.end(1))
        k = a.end()
    rest = raw[k:].strip()
    return None if rest in (">", "/>", "") else False


def _local_file(src: str, page_dir: Path) -> Path | str:
    """The file a src points to, or the reason it is not a local file."""
    parts = urlsplit(src.strip())
    if parts.scheme or parts.netloc:
        return f"remote ({parts.scheme or 'protocol-relative'})"
    if not parts.path:
        return "empty src"
    if parts.path.startswith("/"):
        return "site-root path (the site root is unknown)"
    return page_dir / unquote(parts.path)


def _inside(target: Path, root: Path) -> bool:
    """Whether the file a path leads to (symlinks and .. resolved) lies inside root."""
    try:
        return target.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _is_decorative(attr: dict) -> bool:
    role = (attr.get("role") or "").strip().lower().split()
    return (role[:1] in (["presentation"], ["none"])
            or (attr.get("aria-hidden") or "").strip().lower() == "true")


# Byte-order marks of the encodings that are not ASCII-compatible (UTF-32 first: its LE mark starts
# with UTF-16's). Anything else is read as UTF-8 with surrogateescape.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
         (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _decode_page(raw: bytes, page: Path) -> tuple[str, bytes, str, str]:
    """(text, byte-order mark, encoding, error handler) that round-trip the page's bytes exactly."""
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            try:
                return raw[len(bom):].decode(encoding, "surrogatepass"), bom, encoding, "surrogatepass"
            except UnicodeDecodeError as e:
                raise ValueError(f"{page}: starts with a {encoding.upper()} byte-order mark but is not valid "
                                 f"{encoding.upper()} at byte {e.start + len(bom)}") from None
    return raw.decode("utf-8", "surrogateescape"), b"", "utf-8", "surrogateescape"


def alt_from_caption(caption: str) -> str:
    """Captions are lower-case word lists; alt text reads better as a sentence."""
    caption = caption.strip()
    return caption[:1].upper() + caption[1:] + ("" if caption.endswith((".", "!", "?")) else ".") if caption else ""


GENERATED_ATTR = 'data-alt-generated="captioner"'  # marks the alt texts this module wrote


def fill_alt_text(html_path, out_path=None, captioner=None, *, beam_size: int = 3, root=None,
                  min_confidence: float = 0.0) -> AltTextReport:
    """Fill the missing or empty alt attributes of local images in `html_path`.

    Returns an AltTextReport whose .data is the new page; when `out_path` is given the page is also written
    there atomically (out_path may equal html_path to edit in place; a symlink is written through and an
    existing file keeps its mode). Only images inside `root` (default: the page's folder) are read.
    `captioner` is a captioner.Captioner; None loads the shipped model, and only if some image needs a caption.
    An image whose description has a confidence below `min_confidence` (or none: a model without grounding
    heads, when min_confidence > 0) keeps its tag as it was and is listed in report.unsure.
    """
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be between 0 and 1, got {min_confidence}")
    html_path = Path(html_path)
    root = Path(root) if root is not None else html_path.parent
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: --root is not a folder")
    try:
        raw_bytes = html_path.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"{html_path}: cannot read page ({e.strerror or e})") from None
    text, bom, encoding, errors = _decode_page(raw_bytes, html_path)
    finder = _ImgFinder(text)
    finder.feed(text)
    finder.close()

    report = AltTextReport(data=raw_bytes)
    todo = _images_needing_alt(text, finder.imgs, html_path, root, report)
    if todo:
        if captioner is None:
            from captioner.apps.api import Captioner
            captioner = Captioner.load(beam_size=beam_size)
        files = list(dict.fromkeys(t[4] for t in todo))  # each file captioned once however often it appears
        results = {}
        for i in tqdm(range(0, len(files), 16), desc="captioning", unit="batch", disable=len(files) <= 16):
            chunk = files[i:i + 16]
            results.update(zip(chunk, captioner.caption_batch(chunk, beam_size=beam_size)))
        text = _insert_alts(text, todo, results, report, min_confidence)
        report.data = bom + text.encode(encoding, errors)
    if out_path is not None:
        atomic_write_bytes(out_path, report.data)
    return report


def _images_needing_alt(text: str, imgs: list, html_path: Path, root: Path, report: AltTextReport) -> list[tuple]:
    """(offset, raw tag, alt span or None, src, file) of each <img> to describe; the others are counted or
    listed in `report` with the reason they are left alone."""
    todo = []
    for offset, raw, attrs in imgs:
        attr = dict(reversed(attrs))  # the first occurrence wins, as in browsers
        alt, src = attr.get("alt"), attr.get("src")
        if alt is not None and alt.strip():
            report.kept += 1
            continue
        if _is_decorative(attr):  # its empty or missing alt is deliberate: screen readers skip it
            report.decorative += 1
            continue
        if src is None:
            report.skipped.append(f"{html_path}: <img> without src at offset {offset}: left alone")
            continue
        target = _local_file(src, html_path.parent)
        if isinstance(target, str):
            report.skipped.append(f"{html_path}: {src[:80]}: {target}: left alone")
            continue
        if not _inside(target, root):
            report.skipped.append(f"{html_path}: {src[:80]}: outside {root} (pass --root to allow): left alone")
            continue
        span = _alt_span(raw)
        if span is False or text[offset:offset + len(raw)] != raw:
            report.errors.append(f"{html_path}: {src}: could not locate the tag safely: left alone")
            continue
        if not target.is_file():
            report.errors.append(f"{target}: image not found (src={src!r} in {html_path}): left alone")
            continue
        todo.append((offset, raw, span, src, target))
    return todo


def _insert_alts(text: str, todo: list[tuple], results: dict, report: AltTextReport, min_confidence: float) -> str:
    """The page with an alt attribute made from each image's caption; failures go to report.errors."""
    # edit from the end of the page backwards so earlier offsets stay valid
    for offset, raw, span, src, target in sorted(todo, key=lambda t: t[0], reverse=True):
        res = results[target]
        if isinstance(res, Exception):
            report.errors.append(f"{error_line(target, res)}: left alone")
            continue
        if min_confidence > 0 and (res.confidence is None or res.confidence < min_confidence):
            said = "no confidence (model without grounding heads)" if res.confidence is None else \
                f"confidence {res.confidence:.2f}"
            report.unsure.append(f"{target}: {said} is below {min_confidence:g} "
                                 f"({alt_from_caption(res.text)!r}): left alone")
            continue
        alt = alt_from_caption(res.text)
        # ASCII-only insertion keeps the page valid in whatever ASCII-compatible charset it declares
        attr_text = 'alt="' + html.escape(alt, quote=True).encode("ascii", "xmlcharrefreplace").decode() + '"'
        if "data-alt-generated" not in raw.lower():
            attr_text += " " + GENERATED_ATTR
        if span is None:  # no alt at all: insert right after the tag name
            k = re.match(_NAME, raw).end()
            new_raw = raw[:k] + " " + attr_text + raw[k:]
        else:
            new_raw = raw[:span[0]] + attr_text + raw[span[1]:]
        text = text[:offset] + new_raw + text[offset + len(raw):]
        report.filled.append((src, alt))
    report.filled.reverse()  # back to document order
    report.errors.sort()
    report.unsure.sort()
    return text
