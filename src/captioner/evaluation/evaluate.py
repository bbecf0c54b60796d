"""`captioner evaluate`: decode a split and score it the COCO-toolkit way, or score anyone's captions.

Two modes share the references, the scoring and the outputs (metrics.json, captions.json, report.html):
- model mode: decode every present image of the split with a checkpoint (features from the WORKDIR's
  feature store when it has them, otherwise encoded on the fly), then score;
- captions mode (`captions_file`): score a COCO results file [{"image_id", "caption"}] from any system,
  so other models are compared with ours on exactly equal terms. No model is loaded.
References are the split's original captions; the metrics tokenise them as the toolkit does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from captioner.evaluation.chair import CHAIR_KEYS, chair
from captioner.evaluation.metrics import METRIC_KEYS, score_captions
from captioner.evaluation.report import METRIC_NAMES, write_report
from captioner.io import atomic_write_json

NUM_ATTENTION_SAMPLES = 8  # images drawn with per-word attention overlays in the report


# -----------------------------------------------------------------------------
# references and candidates from files

def load_split(data, split: str) -> list:
    """The split's records (ImageRecord) from a prepared WORKDIR or a raw dataset ROOT."""
    from captioner.data.datasets import load_prepared, read_dataset
    data = Path(data)
    if (data / "dataset.jsonl").is_file():
        records = load_prepared(data).split(split)
    else:
        readout = read_dataset(data)  # ValueError naming what it looked for when the layout is unknown
        records = readout.split(split)
    if not records:
        raise ValueError(f"{data}: the {split} split has no images")
    return records


def load_references_file(path) -> dict[str, list[str]]:
    """COCO annotations {"images", "annotations": [{"image_id", "caption"}]} or JSONL {"image", "caption"}.

    Keys are image ids as strings; for COCO files an image's file_name works as its id too.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such references file")
    text = path.read_text(encoding="utf-8-sig")
    refs: dict[str, list[str]] = {}
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                image, caption = str(d["image"]), d["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"image\", \"caption\"}} ({type(e).__name__}: {e})") from None
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}:{n}: empty or non-text caption")
            refs.setdefault(image, []).append(caption)
    else:
        try:
            d = json.loads(text)
            anns = d["annotations"]
            names = {str(im["id"]): im.get("file_name") for im in d.get("images", [])}
            for a in anns:
                refs.setdefault(str(a["image_id"]), []).append(str(a["caption"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a COCO annotations file ({type(e).__name__}: {e})") from None
        for image_id, name in names.items():
            if name and image_id in refs and name not in refs:
                refs[name] = refs[image_id]
    if not refs:
        raise ValueError(f"{path}: no references")
    return refs


def load_results_file(path) -> tuple[dict[str, str], list[str]]:
    """COCO results [{"image_id", "caption"}] -> ({image_id: caption}, notes). Bad items are skipped
    and reported; a second caption for an image is ignored (the toolkit scores one per image)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such captions file")
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a COCO results list [{{\"image_id\", \"caption\"}}, ...]")
    captions, bad, dupes = {}, [], 0
    for i, it in enumerate(items):
        if not (isinstance(it, dict) and "image_id" in it and isinstance(it.get("caption"), str)):
            bad.append(i)
            continue
        key = str(it["image_id"])
        if key in captions:
            dupes += 1
        else:
            captions[key] = it["caption"]
    notes = []
    if bad:
        notes.append(f"{path}: skipped {len(bad)} item(s) without image_id and caption text "
                     f"(item {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
    if dupes:
        notes.append(f"{path}: {dupes} extra caption(s) for an image already captioned; kept the first")
    if not captions:
        raise ValueError(f"{path}: no usable captions")
    return captions, notes


# -----------------------------------------------------------------------------
# decoding

def _open_store(data, encoder: str):
    """The WORKDIR's feature store for this encoder, or None (then images are encoded on the fly)."""
    from captioner.features.store import FeatureStore
    if not (Path(data) / "features" / encoder).is_dir():
        return None, None
    try:
        return FeatureStore.open(data, encoder), None
    except ValueError as e:  # incomplete or mismatched store: still usable for nothing, say why
        return None, f"feature store not used: {e}"


def decode_split(captioner, records, *, data, beam_size: int, batch_size: int, progress: bool = True,
                 attention_ids: set | None = None):
    """Caption every record with `captioner` (an apps.api.Captioner: the same path users run). Returns
    ({image_id: CaptionResult}, notes, counts).

    Grids come from the WORKDIR's feature store where it has the image, otherwise from the encoder; images
    that cannot be read are reported and skipped.
    """
    from captioner.data.images import ImageError

    store, note = _open_store(data, captioner.spec.name)
    weights = "int8" if captioner.int8_encoder else "float32"
    if store is not None and store.weights != weights:  # score the grids people get
        store, note = None, (f"feature store not used: it holds {store.weights} grids, photos go through the "
                             f"{weights} encoder (`captioner features{' --int8' if weights == 'int8' else ''}`)")
    notes = [note] if note else []
    results, counts = {}, {"features_from_store": 0, "features_encoded": 0, "unreadable": 0}
    attention_ids = attention_ids or set()
    bar = tqdm(total=len(records), desc=f"decoding (beam {beam_size})", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        stored = [r.image_id for r in batch if store is not None and r.image_id in store]
        if stored:
            grids = store.get(stored)
            results.update(zip(stored, captioner.caption_features(grids, beam_size=beam_size)))
            counts["features_from_store"] += len(stored)
            # attention only for the few images the report draws: a second small decode is cheaper
            # than carrying attention for every beam of every image
            want = [i for i, image_id in enumerate(stored) if image_id in attention_ids]
            if want:
                results.update(zip([stored[i] for i in want],
                                   captioner.caption_features(grids[want], beam_size=beam_size, attention=True)))
        rest = [r for r in batch if store is None or r.image_id not in store]
        if rest:
            drawn = any(r.image_id in attention_ids for r in rest)  # attention only if the report draws one
            for r, res in zip(rest, captioner.caption_batch([r.path for r in rest], beam_size=beam_size,
                                                            attention=drawn)):
                if isinstance(res, ImageError):
                    counts["unreadable"] += 1
                    notes.append(f"skipped {r.image_id}: {str(res).split(': ', 1)[-1]}")
                else:
                    results[r.image_id] = res
                    counts["features_encoded"] += 1
        bar.update(len(batch))
    bar.close()
    return results, notes, counts


# -----------------------------------------------------------------------------
# the command

def _extra(result) -> dict:
    """What captions.json keeps beside the scored text: the model's own sentence and its confidence."""
    if result is None or result.confidence is None:
        return {}
    return {"model_caption": result.caption, "confidence": result.confidence}


def format_table(metrics: dict) -> str:
    """The corpus scores as a small aligned text table."""
    keys = METRIC_KEYS + CHAIR_KEYS
    names = [METRIC_NAMES[k] for k in keys]
    values = ["n/a" if metrics.get(k) is None else f"{metrics[k]:.4f}" for k in keys]
    widths = [max(len(a), len(b)) for a, b in zip(names, values)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return line(names) + "\n" + line(values)


@dataclass
class Candidates:
    """The captions to score and what the outputs show beside them."""
    captions: dict[str, str]                                   # image_id -> caption text
    info: dict                                                 # what was scored: split, model, beam, ...
    notes: list[str] = field(default_factory=list)             # skipped images and other caveats
    details: dict = field(default_factory=dict)                # image_id -> CaptionResult (model mode)
    attention: list[dict] = field(default_factory=list)        # the report's attention overlays


def evaluate(model: str | Path | None, data: str | Path, split: str = "dev", *, beam_size: int = 3,
             out: str | Path, captions_file=None, references_file=None, max_len: int = 30,
             batch_size: int = 100, progress: bool = True, limit: int | None = None, meteor: bool = True,
             backend: str = "auto", int8: bool = True, grounded: bool = True) -> dict:
    """Score a split (see the module docstring) and write metrics.json, captions.json and report.html.

    data may be None only when references_file is given. limit keeps the first N images of the split
    (quick checks). Decoding (model mode) runs the same Captioner as `captioner caption`: beam_size,
    max_len, backend, int8 and grounded are its settings, batch_size the images per batch.
    Returns the metrics dict written to metrics.json.
    """
    references, paths = _references(data, split, references_file)
    if captions_file is not None:
        scored = _captions_from_file(captions_file, references, split, limit)
    else:
        if data is None:
            raise ValueError("decoding a model needs --data (a WORKDIR or dataset ROOT with the images)")
        from captioner.apps.api import Captioner
        from captioner.checkpoint import load_checkpoint
        ckpt = load_checkpoint(model)
        captioner = Captioner(ckpt, beam_size=beam_size, max_len=max_len, int8=int8, grounded=grounded,
                              backend=backend)
        scored = _captions_from_model(captioner, data, split, references, paths, beam_size=beam_size,
                                      batch_size=batch_size, progress=progress, limit=limit)
        counts = scored.info.pop("counts")
        scored.info.update(model=ckpt.meta.get("name") or Path(ckpt.path).stem, encoder=ckpt.config.encoder,
                           beam_size=beam_size, max_len=max_len, decoder_weights="int8" if int8 else "float32",
                           encoder_weights="int8" if captioner.int8_encoder else "float32",
                           grounded=captioner.describer is not None, **counts)
    return _score_and_write(Path(out), scored, references, paths, split, meteor)


def _references(data, split: str, references_file) -> tuple[dict[str, list[str]], dict[str, Path | None]]:
    """({image_id: reference captions}, {image_id: image path}) from the references file or the split."""
    if references_file is None:
        if data is None:
            raise ValueError("evaluate needs --data (a WORKDIR or dataset ROOT) or --references")
        records = load_split(data, split)
        return {r.image_id: r.captions for r in records}, {r.image_id: r.path for r in records}
    references, paths = load_references_file(references_file), {}
    if data is not None:
        try:  # image files for the report's thumbnails when the dataset is at hand
            paths = {r.image_id: r.path for r in load_split(data, split)}
        except ValueError:
            pass
    return references, paths


def _captions_from_file(captions_file, references: dict, split: str, limit: int | None) -> Candidates:
    """Captions mode: another system's COCO results file, restricted to the images with references."""
    candidates, notes = load_results_file(captions_file)
    unknown = [k for k in candidates if k not in references]
    if unknown:
        notes.append(f"{captions_file}: {len(unknown)} caption(s) for images without references skipped "
                     f"(e.g. {', '.join(unknown[:3])})")
    candidates = {k: v for k, v in candidates.items() if k in references}
    if limit:
        candidates = dict(list(candidates.items())[:limit])
    if not candidates:
        raise ValueError(f"{captions_file}: none of its image ids has references in the {split} split")
    uncaptioned = len(references) - len(candidates)
    if uncaptioned and not limit:
        notes.append(f"{uncaptioned} image(s) with references have no caption in {captions_file}; "
                     "scored only the captioned ones")
    return Candidates(candidates, {"split": split, "model": Path(captions_file).name, "encoder": None,
                                   "beam_size": None}, notes)


def _captions_from_model(captioner, data, split: str, references: dict, paths: dict, *, beam_size: int,
                         batch_size: int, progress: bool, limit: int | None) -> Candidates:
    """Model mode: caption every present image of the split; a few also with attention, for the report.
    info["counts"] says where the grids came from (the caller adds what it knows about the model)."""
    from captioner.data.datasets import ImageRecord
    present = [k for k in references if paths.get(k) is not None]
    notes = []
    absent = len(references) - len(present)
    if absent:
        notes.append(f"{absent} of {len(references)} {split} images are absent from the dataset; not scored")
    if limit:
        present = present[:limit]
    if not present:
        raise ValueError(f"{data}: none of the {len(references)} {split} images is present; nothing to decode")
    records = [ImageRecord(k, paths[k], references[k], split) for k in present]
    sample = set(present[:: max(1, len(present) // NUM_ATTENTION_SAMPLES)][:NUM_ATTENTION_SAMPLES])
    decoded, more, counts = decode_split(captioner, records, data=data, beam_size=beam_size,
                                         batch_size=batch_size, progress=progress, attention_ids=sample)
    if not decoded:
        raise ValueError(f"{data}: no {split} image could be read; nothing to score")
    attention = [{"image_id": k, "path": paths[k], "words": decoded[k].tokens, "attention": decoded[k].attention}
                 for k in sample if k in decoded and decoded[k].attention is not None and decoded[k].tokens]
    return Candidates({k: r.text for k, r in decoded.items()}, {"split": split, "counts": counts}, notes + more,
                      dict(decoded), attention)


def _score_and_write(out: Path, scored: Candidates, references: dict, paths: dict, split: str,
                     meteor: bool) -> dict:
    """Score the candidates (COCO metrics and CHAIR) and write metrics.json, captions.json, report.html."""
    candidates, info, details = scored.captions, scored.info, scored.details
    scores = score_captions(candidates, references, meteor=meteor)
    objects, per_image_objects = chair(candidates, references)
    metrics = {**scores.corpus, **objects, **info, "num_images": len(candidates), "tokenizer": scores.tokenizer,
               "notes": scored.notes + scores.notes}

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "captions.json", [{"image_id": k, "caption": v} | _extra(details.get(k))
                                              for k, v in candidates.items()])
    items = [{"image_id": k, "caption": v, "references": references[k], "scores": scores.per_image[k],
              "objects": per_image_objects[k], "confidence": _extra(details.get(k)).get("confidence"),
              "path": paths.get(k)} for k, v in candidates.items()]
    shown = {k: v for k, v in info.items() if v is not None}
    write_report(out / "report.html", items, scores.corpus, title=f"Caption evaluation: {split} split",
                 info={**shown, "images": len(candidates)}, attention=scored.attention)
    return metrics
