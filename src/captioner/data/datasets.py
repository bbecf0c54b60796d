"""Read a captioning dataset in any of the known layouts, and prepare it into a WORKDIR.

Layouts (detected in this order, see `read_dataset`):
  flickr8k  original release: Flickr8k.token.txt ("name.jpg#k<TAB>caption") + Flickr_8k.{train,dev,test}Images.txt,
            text files at the root or in Flickr8k_text/ or text/; images in Flicker8k_Dataset/, Flickr8k_Dataset/,
            Images/ or images/.
  karpathy  dataset_flickr8k.json / dataset_flickr30k.json / dataset_coco.json (+ the image folder);
            restval -> train, val -> dev.
  kaggle    captions.txt, a CSV with header "image,caption", + Images/. Splits come from the official Flickr8k
            lists shipped with the package; captioned images in none of them are dropped (counted). When no image
            is in the lists at all (not Flickr8k) a seeded split is drawn instead.
  csv/jsonl custom file(s) with image, caption and optional split ("train"/"dev"/"test"; "val" means dev,
            "restval" train). Without a split column a deterministic seeded split is drawn per image.
            `root` may be the file itself, or a folder holding exactly one .csv or .jsonl.

Decisions on messy input, all reported in `DatasetReadout.problems` as one line naming file and line:
  - images named in the text but absent on disk stay as records with path None (counted as absent);
  - names that are not image file names (Flickr8k's "2258277193_586949ec62.jpg.1") are dropped;
  - malformed lines and empty captions are dropped; duplicate captions of one image are dropped (counted);
  - captioned images in no split are dropped (counted); split-list names without captions are counted;
  - a file that is not UTF-8 is decoded as cp1252 (latin-1 if that fails too) with a warning.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.data.text import tokenize
from captioner.data.vocab import Vocabulary
from captioner.io import atomic_write_json, atomic_write_text, read_json

SPLITS = ("train", "dev", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_ALIASES = {"train": "train", "restval": "train", "dev": "dev", "val": "dev", "valid": "dev",
                 "validation": "dev", "test": "test"}

TEXT_DIRS = ("", "Flickr8k_text", "text")
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")
KARPATHY_NAMES = ("dataset_flickr8k.json", "dataset_flickr30k.json", "dataset_coco.json")
KARPATHY_IMAGE_DIRS = ("", "images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset",
                       "flickr30k-images", "flickr30k_images")
SPLIT_FILES = {s: f"Flickr_8k.{s}Images.txt" for s in SPLITS}
MAX_PROBLEMS = 1000  # keep memory bounded on a hopeless file; the counters still count everything


@dataclass
class ImageRecord:
    image_id: str          # file name (relative path for COCO)
    path: Path | None      # absolute; None when the image file is absent
    captions: list[str]    # original text
    split: str             # "train" | "dev" | "test"


@dataclass
class DatasetReadout:
    root: Path
    layout: str
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # lines, captions, duplicates, malformed, bogus_names, ...

    def problem(self, msg: str) -> None:
        self.counts["problems"] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(msg)

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == name]


# -------------------------------------------------------------------------------------------
# small helpers

def _read_text(path: Path, out: DatasetReadout) -> str:
    """Decode a text file: UTF-8 (BOM allowed), else cp1252/latin-1 with a warning. Line ends are normalised."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        for enc in ("cp1252", "latin-1"):  # latin-1 decodes any byte, so this always ends
            try:
                text = data.decode(enc)
                break
            except UnicodeDecodeError:
                continue
        out.problem(f"{path}: not UTF-8 (bad byte 0x{data[e.start]:02x} at offset {e.start}); decoded as {enc}")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _csv_rows(reader, path: Path, out: DatasetReadout):
    """The rows of a csv reader; a row the csv module refuses (a field over csv.field_size_limit(), which no
    real caption reaches) is reported as file:line and dropped, and reading goes on with the next one."""
    lines = getattr(reader, "reader", reader)  # a DictReader's own line_num lags on errors
    while True:
        start = lines.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            out.counts["malformed"] += 1
            out.problem(f"{path}:{start}: {e}; dropped")
            continue
        yield row


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _first(names, n=5) -> str:
    names = list(names)
    more = f", ... (+{len(names) - n})" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _find(root: Path, dirs, names) -> Path | None:
    for d in dirs:
        for n in names:
            p = root / d / n
            if p.is_file():
                return p
    return None


def _find_dir(root: Path, dirs) -> Path | None:
    for d in dirs:
        if (root / d).is_dir():
            return root / d
    return None


class _Collector:
    """Gathers (image, caption, split) rows into records: drops duplicates, keeps first-seen order."""

    def __init__(self, out: DatasetReadout):
        self.out = out
        self.captions: dict[str, list[str]] = {}
        self.seen: dict[str, set[str]] = {}
        self.splits: dict[str, str | None] = {}
        self.duplicates: list[str] = []  # where each dropped duplicate was, reported once at the end

    def add(self, image_id: str, caption: str, where: str, split: str | None = None) -> None:
        out = self.out
        caption = caption.strip()
        if not _is_image_name(image_id):
            out.counts["bogus_names"] += 1
            out.problem(f"{where}: {image_id!r} is not an image file name; dropped")
            return
        key = " ".join(tokenize(caption))  # duplicates are judged on the normalised text
        if not key:
            out.counts["malformed"] += 1
            out.problem(f"{where}: empty caption for {image_id}; dropped")
            return
        seen = self.seen.setdefault(image_id, set())
        if key in seen:
            out.counts["duplicates"] += 1
            self.duplicates.append(where)
            return
        seen.add(key)
        self.captions.setdefault(image_id, []).append(caption)
        previous = self.splits.setdefault(image_id, split)
        if previous != split:
            out.problem(f"{where}: {image_id} already in split {previous!r}, not {split!r}; kept {previous!r}")
        out.counts["captions"] += 1

    def report(self) -> None:
        if self.duplicates:
            self.out.problem(f"{len(self.duplicates)} duplicate captions of the same image dropped: "
                             f"{_first(self.duplicates, 3)}")


def _locate(image_id: str, listings: dict[Path, set[str]]) -> Path | None:
    if Path(image_id).is_absolute():
        return Path(image_id) if Path(image_id).is_file() else None
    head = image_id.split("/", 1)[0]  # COCO ids carry a subfolder
    for d, names in listings.items():
        if head in names and (d / image_id).is_file():
            return d / image_id  # d is already absolute; symlinked names stay as named
    return None


def _resolve_paths(out: DatasetReadout, image_dirs: list[Path | None]) -> None:
    """Set each record's absolute path from the first folder holding it, or None; count absent per split."""
    listings = {}
    for d in image_dirs:
        if d is not None and d.is_dir():
            listings[d] = set(os.listdir(d))  # one listing instead of thousands of stat calls
    absent: dict[str, list[str]] = {}
    for r in out.records:
        r.path = _locate(r.image_id, listings)
        if r.path is None:
            absent.setdefault(r.split, []).append(r.image_id)
    for split, names in absent.items():
        out.counts[f"absent_{split}"] = len(names)
        out.problem(f"{len(names)} {split} images named in the captions are absent from "
                    f"{_first(str(d) for d in listings) or 'any image folder'}: {_first(names)}")


def _seeded_splits(image_ids, fractions, seed) -> dict[str, str]:
    """Deterministic split of image ids: sort, shuffle with the seed, cut by the fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be three non-negative numbers, got {fractions}")
    ids = sorted(image_ids)
    random.Random(seed).shuffle(ids)
    total = sum(fractions)
    n_train = round(len(ids) * fractions[0] / total)
    n_dev = round(len(ids) * fractions[1] / total)
    return {i: ("train" if k < n_train else "dev" if k < n_train + n_dev else "test") for k, i in enumerate(ids)}


def _read_split_list(path: Path, out: DatasetReadout) -> list[str]:
    return [line.strip() for line in _read_text(path, out).split("\n") if line.strip()]


def _shipped_split_lists() -> dict[str, list[str]]:
    base = resources.files("captioner.data") / "splits"
    return {s: [l.strip() for l in (base / SPLIT_FILES[s]).read_text(encoding="utf-8").splitlines() if l.strip()]
            for s in SPLITS}


def _apply_official_splits(col: _Collector, lists: dict[str, list[str]], out: DatasetReadout, where: str) -> None:
    """Records for captioned images named in a split list; the rest are counted and dropped."""
    assigned: dict[str, str] = {}
    for split in SPLITS:
        missing = []
        for name in lists[split]:
            if name in assigned:
                out.problem(f"{where}: {name} listed in both {assigned[name]} and {split}; kept {assigned[name]}")
                continue
            assigned[name] = split
            if name not in col.captions:
                missing.append(name)
        if missing:
            out.counts[f"listed_without_captions_{split}"] = len(missing)
            out.problem(f"{where}: {len(missing)} {split} images have no captions: {_first(missing)}")
    unsplit = [i for i in col.captions if i not in assigned]
    if unsplit:
        out.counts["unsplit"] = len(unsplit)
        out.problem(f"{where}: {len(unsplit)} captioned images are in no split list; dropped: {_first(unsplit)}")
    for split in SPLITS:
        for name in lists[split]:
            if assigned.get(name) == split and name in col.captions:
                out.records.append(ImageRecord(name, None, col.captions[name], split))


def _records_from_rows(col: _Collector, out: DatasetReadout, fractions, seed) -> None:
    """Records for layouts that carry their own split (or none: then a seeded split)."""
    drawn = None
    if any(s is None for s in col.splits.values()):
        drawn = _seeded_splits([i for i, s in col.splits.items() if s is None], fractions, seed)
        out.counts["seeded_split"] = len(drawn)
    for image_id, caps in col.captions.items():
        split = col.splits[image_id] or drawn[image_id]
        out.records.append(ImageRecord(image_id, None, caps, split))


# -------------------------------------------------------------------------------------------
# the layouts

def _read_flickr8k(root: Path, token_file: Path) -> DatasetReadout:
    out = DatasetReadout(root, "flickr8k")
    col = _Collector(out)
    for n, line in enumerate(_read_text(token_file, out).split("\n"), 1):
        if not line.strip():
            continue
        out.counts["lines"] += 1
        where = f"{token_file}:{n}"
        name_k, tab, caption = line.partition("\t")
        name, hash_, k = name_k.strip().rpartition("#")
        if not tab or not hash_ or not k.isdigit():
            out.counts["malformed"] += 1
            out.problem(f"{where}: expected 'IMAGE.jpg#K<TAB>caption'; dropped")
            continue
        col.add(name, caption, where)

    col.report()
    lists, text_dir = {}, token_file.parent
    for split in SPLITS:
        p = text_dir / SPLIT_FILES[split]
        if p.is_file():
            lists[split] = _read_split_list(p, out)
    if len(lists) < 3:
        out.problem(f"{text_dir}: no {', '.join(SPLIT_FILES[s] for s in SPLITS if s not in lists)}; "
                    "used the official lists shipped with captioner")
        shipped = _shipped_split_lists()
        lists = {s: lists.get(s, shipped[s]) for s in SPLITS}
    _apply_official_splits(col, lists, out, str(text_dir))
    image_dir = _find_dir(root, IMAGE_DIRS)
    if image_dir is None:
        out.problem(f"{root}: no image folder ({', '.join(IMAGE_DIRS)}); every image counts as absent")
    _resolve_paths(out, [image_dir])
    return out


def _read_kaggle(root: Path, captions_file: Path, fractions, seed) -> DatasetReadout:
    out = DatasetReadout(root, "kaggle")
    col = _Collector(out)
    reader = csv.reader(io.StringIO(_read_text(captions_file, out)))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise ValueError(f"{captions_file}:1: unreadable header ({e})") from None
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise ValueError(f"{captions_file}:1: expected the header 'image,caption', got {header}")
    for row in _csv_rows(reader, captions_file, out):
        if not row or not any(c.strip() for c in row):
            continue
        out.counts["lines"] += 1
        where = f"{captions_file}:{reader.line_num}"
        if len(row) < 2:
            out.counts["malformed"] += 1
            out.problem(f"{where}: expected 'image,caption'; dropped")
            continue
        col.add(row[0].strip(), ",".join(row[1:]), where)  # an unquoted comma belongs to the caption

    col.report()
    lists = _shipped_split_lists()
    if any(name in col.captions for names in lists.values() for name in names):
        _apply_official_splits(col, lists, out, "official Flickr8k split lists")
    else:
        out.problem(f"{captions_file}: no image is in the official Flickr8k split lists; drew a seeded split")
        _records_from_rows(col, out, fractions, seed)
    image_dir = _find_dir(root, IMAGE_DIRS)
    if image_dir is None:
        out.problem(f"{root}: no image folder ({', '.join(IMAGE_DIRS)}); every image counts as absent")
    _resolve_paths(out, [image_dir])
    return out


def _read_karpathy(root: Path, json_file: Path) -> DatasetReadout:
    out = DatasetReadout(root, "karpathy")
    col = _Collector(out)
    try:
        data = json.loads(_read_text(json_file, out))
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_file}: not a Karpathy split file (expected an object with an 'images' list)")
    for k, img in enumerate(data["images"]):
        where = f"{json_file}: images[{k}]"
        out.counts["lines"] += 1
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) \
                or not isinstance(img.get("sentences"), list):
            out.counts["malformed"] += 1
            out.problem(f"{where}: expected 'filename' and a 'sentences' list; dropped")
            continue
        split = SPLIT_ALIASES.get(str(img.get("split", "")).lower())
        if split is None:
            out.counts["malformed"] += 1
            out.problem(f"{where}: unknown split {img.get('split')!r}; dropped")
            continue
        image_id = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else img["filename"]
        for j, s in enumerate(img["sentences"]):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(map(str, s["tokens"]))
            if not isinstance(raw, str):
                out.counts["malformed"] += 1
                out.problem(f"{where}.sentences[{j}]: no 'raw' text; dropped")
                continue
            col.add(image_id, raw, f"{where}.sentences[{j}]", split)
    col.report()
    _records_from_rows(col, out, (1, 0, 0), 0)  # every row has a split, nothing is drawn

    # the folder holding most of the first images is the image folder
    candidates = [root / d for d in KARPATHY_IMAGE_DIRS if (root / d).is_dir()]
    sample = out.records[:50]
    best = max(candidates, key=lambda d: sum((d / r.image_id).is_file() for r in sample), default=None)
    _resolve_paths(out, [best])
    return out


def _read_custom(path: Path, fractions, seed) -> DatasetReadout:
    layout = "jsonl" if path.suffix.lower() == ".jsonl" else "csv"
    out = DatasetReadout(path, layout)
    col = _Collector(out)
    text = _read_text(path, out)
    rows = []  # (where, image, caption, split)
    if layout == "csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            fields = [f.strip().lower() for f in reader.fieldnames or []]
        except csv.Error as e:
            raise ValueError(f"{path}:1: unreadable header ({e})") from None
        if "image" not in fields or "caption" not in fields:
            raise ValueError(f"{path}:1: expected a header with 'image' and 'caption' columns, got {fields}")
        reader.fieldnames = fields
        for row in _csv_rows(reader, path, out):
            rows.append((f"{path}:{reader.line_num}", row.get("image"), row.get("caption"), row.get("split")))
    else:
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.counts["malformed"] += 1
                out.problem(f"{path}:{n}: not valid JSON ({e.msg}); dropped")
                continue
            if not isinstance(obj, dict):
                obj = {}
            caps = obj.get("captions", [obj.get("caption")])
            for cap in caps if isinstance(caps, list) else [caps]:
                rows.append((f"{path}:{n}", obj.get("image"), cap, obj.get("split")))

    for where, image, caption, split in rows:
        out.counts["lines"] += 1
        if not isinstance(image, str) or not image.strip() or not isinstance(caption, str):
            out.counts["malformed"] += 1
            out.problem(f"{where}: needs an 'image' and a 'caption'; dropped")
            continue
        if split is not None and str(split).strip():
            split_name = SPLIT_ALIASES.get(str(split).strip().lower())
            if split_name is None:
                out.counts["malformed"] += 1
                out.problem(f"{where}: unknown split {split!r} (use train, dev or test); dropped")
                continue
        else:
            split_name = None
        col.add(image.strip(), caption, where, split_name)
    col.report()
    _records_from_rows(col, out, fractions, seed)
    # relative image paths resolve against the file's folder or its images/ subfolder
    _resolve_paths(out, [path.parent, path.parent / "images", path.parent / "Images"])
    return out


def read_dataset(root, *, split_fractions=(0.8, 0.1, 0.1), seed: int = 0) -> DatasetReadout:
    """Detect the layout under `root` (a folder, or a custom .csv/.jsonl/.json file) and read it.

    Raises ValueError with one line naming what was looked for when nothing is recognised.
    """
    root = Path(root).expanduser().resolve()
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix in (".csv", ".jsonl"):
            return _read_custom(root, split_fractions, seed)
        if suffix == ".json":
            return _read_karpathy(root.parent, root)
        raise ValueError(f"{root}: not a dataset file (expected .csv, .jsonl or a Karpathy .json)")
    if not root.is_dir():
        raise ValueError(f"{root}: no such file or folder")

    token_file = _find(root, TEXT_DIRS, ["Flickr8k.token.txt"])
    if token_file:
        return _read_flickr8k(root, token_file)
    json_file = _find(root, TEXT_DIRS, KARPATHY_NAMES)
    if json_file:
        return _read_karpathy(root, json_file)
    captions_file = _find(root, TEXT_DIRS, ["captions.txt"])
    if captions_file:
        return _read_kaggle(root, captions_file, split_fractions, seed)
    customs = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".jsonl"))
    if len(customs) == 1:
        return _read_custom(customs[0], split_fractions, seed)
    if len(customs) > 1:
        raise ValueError(f"{root}: several caption files ({_first(p.name for p in customs)}); pass one of them")
    raise ValueError(f"{root}: no known dataset layout; looked for Flickr8k.token.txt, {', '.join(KARPATHY_NAMES)}, "
                     f"captions.txt (at the root, Flickr8k_text/ or text/) and a .csv/.jsonl file")


# -------------------------------------------------------------------------------------------
# prepare: read, tokenise, build the vocabulary, write the WORKDIR

def prepare(root, out, *, min_count: int = 5, max_len: int | None = None, progress: bool = True,
            split_fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict:
    """Write dataset.jsonl, vocab.json and summary.json into `out`; return the summary.

    Tokens in dataset.jsonl are cut to max_len words when given; captions stay as written (metric references).
    """
    readout = read_dataset(root, split_fractions=split_fractions, seed=seed)
    if not readout.records:
        raise ValueError(f"{readout.root}: no usable captions ({_first(readout.problems, 1) or 'empty'})")
    if not any(r.path for r in readout.records):  # nothing to encode or train on: say so, write nothing
        absent = next((p for p in readout.problems if " absent from " in p), "no image folder")
        raise ValueError(f"{readout.root}: none of the {len(readout.records)} images it names exist ({absent})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokens: dict[str, list[list[str]]] = {}
    for r in tqdm(readout.records, desc="tokenising", unit="img", disable=not progress):
        tokens[r.image_id] = [tokenize(c) for c in r.captions]
    by_split = {s: [t for r in readout.records if r.split == s for t in tokens[r.image_id]] for s in SPLITS}
    vocab = Vocabulary.build(by_split["train"], min_count=min_count)
    lengths = np.array([len(t) for ts in tokens.values() for t in ts])

    lines = []
    for r in readout.records:
        toks = [t[:max_len] for t in tokens[r.image_id]] if max_len else tokens[r.image_id]
        lines.append(json.dumps({"image_id": r.image_id, "path": str(r.path) if r.path else None,
                                 "split": r.split, "captions": r.captions, "tokens": toks}, ensure_ascii=False))
    summary = {
        "layout": readout.layout,
        "root": str(readout.root),
        "splits": {s: {"images": sum(r.split == s for r in readout.records),
                       "present": sum(r.split == s and r.path is not None for r in readout.records),
                       "absent": sum(r.split == s and r.path is None for r in readout.records),
                       "captions": len(by_split[s])} for s in SPLITS},
        "vocab_size": len(vocab),
        "min_count": min_count,
        "max_len": max_len,
        "unk_rate_train": round(vocab.unk_rate(by_split["train"]), 6),
        "unk_rate_dev": round(vocab.unk_rate(by_split["dev"]), 6),
        "caption_length": {**{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)},
                           "max": int(lengths.max())},
        "truncated_captions": int((lengths > max_len).sum()) if max_len else 0,
        "counts": dict(sorted(readout.counts.items())),
        "problems": {"count": readout.counts["problems"], "first": readout.problems[:10]},
    }
    vocab.save(out / "vocab.json")
    atomic_write_text(out / "dataset.jsonl", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", summary)
    return summary


@dataclass
class PreparedData:
    root: Path
    records: list[ImageRecord]
    tokens: dict[str, list[list[str]]]  # image_id -> tokenised captions
    vocab: Vocabulary
    summary: dict

    def split(self, name: str) -> list[ImageRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]


def load_prepared(workdir) -> PreparedData:
    """Read what `prepare` wrote. Any missing or damaged file raises ValueError naming it."""
    workdir = Path(workdir)
    data_file = workdir / "dataset.jsonl"
    if not data_file.is_file():
        raise ValueError(f"{data_file}: missing; run `captioner prepare DATASET --out {workdir}` first")
    records, tokens = [], {}
    with open(data_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = ImageRecord(d["image_id"], Path(d["path"]) if d["path"] else None, list(d["captions"]),
                                  d["split"])
                toks = [list(t) for t in d["tokens"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{data_file}:{n}: damaged record ({type(e).__name__}: {e})") from None
            if rec.split not in SPLITS:
                raise ValueError(f"{data_file}:{n}: unknown split {rec.split!r}")
            records.append(rec)
            tokens[rec.image_id] = toks
    if not records:
        raise ValueError(f"{data_file}: no records")
    vocab = Vocabulary.load(workdir / "vocab.json")
    try:
        summary = read_json(workdir / "summary.json")
    except (OSError, ValueError) as e:
        raise ValueError(f"{workdir / 'summary.json'}: unreadable ({e})") from None
    return PreparedData(workdir, records, tokens, vocab, summary)
