"""Photo metadata: put descriptions and tags where photo managers (digiKam, darktable, Lightroom) read them.

By default each photo gets an XMP sidecar next to it, `photo.jpg.xmp`, and the photo itself is never opened
for writing: dc:description (the description people are shown, `CaptionResult.text`, as the x-default
language alternative) and dc:subject (the tags, a bag). The text is marked as machine-made in our own
namespace (captioner:Generated, captioner:Model), so people and tools can tell it from a human's.

An existing sidecar is merged, not replaced: its other properties stay, keywords a person added stay, and a
description that captioner did not write is left alone. `in_file=True` writes the same two fields into the
image file's own XMP with exiftool (metadata only: exiftool rewrites no pixel data).
"""
from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from captioner.io import atomic_write_bytes

NS = {"x": "adobe:ns:meta/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
      "dc": "http://purl.org/dc/elements/1.1/", "xml": "http://www.w3.org/XML/1998/namespace",
      "captioner": "urn:captioner:xmp:1.0/"}
for _prefix, _uri in NS.items():
    if _prefix != "xml":
        ET.register_namespace(_prefix, _uri)  # output prefixes only; parsing does not depend on them


class MetadataError(ValueError):
    """A photo whose metadata could not be written; the message is one line, "PATH: reason"."""


def _q(name: str) -> str:
    prefix, local = name.split(":")
    return f"{{{NS[prefix]}}}{local}"


def sidecar_path(photo) -> Path:
    """`photo.jpg` -> `photo.jpg.xmp` (the darktable/digiKam naming, which keeps photo.jpg and photo.png apart)."""
    photo = Path(photo)
    return photo.with_name(photo.name + ".xmp")


def _bag_items(parent: ET.Element | None) -> list[str]:
    return [li.text or "" for li in parent.iter(_q("rdf:li"))] if parent is not None else []


def _set_bag(desc: ET.Element, name: str, items: list[str]) -> None:
    for old in desc.findall(_q(name)):
        desc.remove(old)
    if items:
        bag = ET.SubElement(ET.SubElement(desc, _q(name)), _q("rdf:Bag"))
        for item in items:
            ET.SubElement(bag, _q("rdf:li")).text = item


def _take(descs: list[ET.Element], name: str) -> list[str]:
    """Remove property `name` from every description; returns its items."""
    items = []
    for d in descs:
        for old in d.findall(_q(name)):
            items += _bag_items(old)
            d.remove(old)
    return items


def sidecar_xml(existing: bytes | None, description: str, tags: list[str], model: str | None = None) -> bytes:
    """The sidecar's new bytes: `existing` (None: a new sidecar) with our description and tags merged in."""
    if existing:
        root = ET.fromstring(existing)  # ParseError is the caller's to report
        rdf = root if root.tag == _q("rdf:RDF") else root.find(_q("rdf:RDF"))
        if rdf is None:
            raise ValueError("no rdf:RDF element: not an XMP packet")
    else:
        root = ET.Element(_q("x:xmpmeta"))
        rdf = ET.SubElement(root, _q("rdf:RDF"))
    # XMP may split the properties over several rdf:Description elements (exiftool writes one per namespace):
    # ours is the one we wrote before, else the first
    descs = rdf.findall(_q("rdf:Description"))
    desc = next((d for d in descs if d.find(_q("captioner:Generated")) is not None), descs[0] if descs else None)
    if desc is None:
        desc = ET.SubElement(rdf, _q("rdf:Description"), {_q("rdf:about"): ""})
        descs = [desc]
    generated = (desc.findtext(_q("captioner:Generated")) or "").split()
    human_text = any(d.find(_q("dc:description")) is not None for d in descs) and "dc:description" not in generated
    # a person's keywords stay; the tags we wrote last time are replaced by today's
    previous_tags = set(_bag_items(desc.find(_q("captioner:Tags"))))
    kept = [t for t in _take(descs, "dc:subject") if t not in previous_tags]
    _set_bag(desc, "dc:subject", list(dict.fromkeys(kept + tags)))
    _set_bag(desc, "captioner:Tags", tags)
    if not human_text:
        _take(descs, "dc:description")
        alt = ET.SubElement(ET.SubElement(desc, _q("dc:description")), _q("rdf:Alt"))
        ET.SubElement(alt, _q("rdf:li"), {_q("xml:lang"): "x-default"}).text = description
    for name, value in (("captioner:Generated", "dc:subject" if human_text else "dc:description dc:subject"),
                        ("captioner:Model", model)):
        for old in desc.findall(_q(name)):
            desc.remove(old)
        if value:
            ET.SubElement(desc, _q(name)).text = value
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_sidecar(photo, description: str, tags: list[str], model: str | None = None) -> Path:
    """Write or merge `photo.jpg.xmp`; the photo is not touched. Rewritten only if its bytes change (so
    photo managers watching mtimes see no change). Raises MetadataError naming the sidecar."""
    path = sidecar_path(photo)
    try:
        existing = path.read_bytes() if path.exists() else None
        data = sidecar_xml(existing, description, tags, model)
        if data != existing:
            atomic_write_bytes(path, data)
    except ET.ParseError as e:
        raise MetadataError(f"{path}: existing sidecar is not valid XML ({e}): left alone") from None
    except ValueError as e:
        raise MetadataError(f"{path}: existing sidecar {e}: left alone") from None
    except OSError as e:
        raise MetadataError(f"{path}: cannot write ({e.strerror or e})") from None
    return path


def exiftool_path() -> str | None:
    return shutil.which("exiftool")


def write_in_file(photo, description: str, tags: list[str]) -> None:
    """Write dc:description and dc:subject into the image file's own XMP with exiftool (Debian:
    libimage-exiftool-perl), which rewrites metadata segments only, never pixel data."""
    exe = exiftool_path()
    if exe is None:
        raise MetadataError(f"{photo}: writing into the file needs exiftool (apt install libimage-exiftool-perl); "
                            "sidecars need nothing")
    args = [exe, "-q", "-q", "-m", "-overwrite_original", "-P", "-charset", "utf8",
            f"-XMP-dc:Description-x-default={description}"]
    for t in tags:  # "-=" then "+=": added once, a person's other keywords kept
        args += [f"-XMP-dc:Subject-={t}", f"-XMP-dc:Subject+={t}"]
    proc = subprocess.run(args + ["--", str(photo)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = " ".join((proc.stderr or proc.stdout).split()) or f"exiftool exit status {proc.returncode}"
        raise MetadataError(f"{photo}: {reason.removeprefix('Error: ')}")


def write_metadata(photo, description: str, tags: list[str], model: str | None = None, *,
                   in_file: bool = False) -> Path | None:
    """The sidecar (default) or, with `in_file`, the file's own XMP; returns the sidecar written, if any."""
    if in_file:
        write_in_file(photo, description, tags)
        return None
    return write_sidecar(photo, description, tags, model)


def tag_files(paths: list, captioner=None, *, in_file: bool = False, beam_size: int = 3, batch_size: int = 16,
              progress: bool = True) -> dict:
    """Caption `paths` and write each one's description and tags; returns {"written": [paths], "errors":
    ["PATH: reason"]}. A bad photo is reported and the rest carry on."""
    from captioner.apps.library import error_line, result_tags
    if in_file and exiftool_path() is None:
        raise MetadataError("--in-file needs exiftool (apt install libimage-exiftool-perl); "
                            "without it, write sidecars")
    if captioner is None:
        from captioner.apps.api import Captioner
        captioner = Captioner.load(beam_size=beam_size)
    model = str(captioner.info.get("name", "")) or None
    report = {"written": [], "errors": []}
    items = [str(p) for p in paths]
    for path, res in zip(items, captioner.caption_iter(items, batch_size=batch_size, beam_size=beam_size,
                                                        progress=progress)):
        if isinstance(res, Exception):
            report["errors"].append(error_line(path, res))
            continue
        try:
            write_metadata(path, res.text, result_tags(res), model, in_file=in_file)
            report["written"].append(path)
        except MetadataError as e:
            report["errors"].append(str(e))
    return report


def write_library_metadata(db_path, folder, *, in_file: bool = False) -> dict:
    """Write the stored description and tags of every captioned photo under `folder` in a library, without
    captioning anything again; same report as tag_files."""
    import json
    from contextlib import closing

    from captioner.apps.library import _open_readonly
    if in_file and exiftool_path() is None:
        raise MetadataError("--in-file needs exiftool (apt install libimage-exiftool-perl); "
                            "without it, write sidecars")
    folder = Path(folder).absolute()
    with closing(_open_readonly(db_path)) as con:
        rows = con.execute("SELECT path, caption, tags, model FROM images WHERE caption IS NOT NULL "
                           "ORDER BY path").fetchall()
    report = {"written": [], "errors": []}
    for path, caption, tag_json, model in rows:
        if not Path(path).is_relative_to(folder):
            continue
        try:
            write_metadata(path, caption, json.loads(tag_json or "[]"), model, in_file=in_file)
            report["written"].append(path)
        except MetadataError as e:
            report["errors"].append(str(e))
    return report
