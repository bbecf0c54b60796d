"""The static-int8 encoder (tools/quantize_encoder.py) against the float one: speed, grid error, and the scores
of the descriptions people get on Flickr8k dev and ../shared/coco-ood-dev (default Captioner: grounded, int8
decoder, beam 3; METEOR left out). The int8 graph is kept only if BLEU-4 and CIDEr-D stay within 0.5.

    python benchmarks/int8_encoder.py [--data ../shared/flickr8k] -> benchmarks/results/int8_encoder.json

Also checks that a photo's int8 grid does not depend on its batch (alone vs in a batch of 16). About 2 min on
2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from captioner.apps.api import Captioner
from captioner.data.images import load_image, preprocess
from captioner.evaluation.chair import chair
from captioner.evaluation.evaluate import load_split
from captioner.evaluation.metrics import score_captions
from captioner.features.encoder import Encoder
from captioner.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def speed(encoder: Encoder, pixels: np.ndarray) -> dict:
    encoder.encode(pixels[:16])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(pixels), 16):
        encoder.encode(pixels[i:i + 16])
    batched = (time.perf_counter() - t) / len(pixels)
    t = time.perf_counter()
    for i in range(32):
        encoder.encode(pixels[i:i + 1])
    alone = (time.perf_counter() - t) / 32
    return {"batch16_ms_per_photo": round(batched * 1000, 2), "batch1_ms": round(alone * 1000, 2),
            "images_per_s_batch16": round(1 / batched, 1)}


def scores(captioner: Captioner, grids: np.ndarray, records) -> dict:
    texts = {}
    for i in range(0, len(records), 100):
        for r, res in zip(records[i:i + 100], captioner.caption_features(grids[i:i + 100])):
            texts[r.image_id] = res.text
    refs = {r.image_id: r.captions for r in records}
    s = score_captions(texts, refs, meteor=False).corpus
    hallucination, _ = chair(texts, refs)
    return {"bleu4": round(100 * s["bleu4"], 2), "cider": round(100 * s["cider"], 2),
            "chair_s": round(100 * hallucination["chair_s"], 1), "object_recall": round(100 * hallucination["object_recall"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "flickr8k")
    ap.add_argument("--ood", type=Path, default=ROOT.parent / "shared" / "coco-ood-dev")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int8_encoder.json")
    args = ap.parse_args()
    captioner = Captioner.load()
    encoders = {"float32": Encoder.load("lite2", backend="onnx"), "int8": Encoder.load("lite2", backend="onnx", int8=True)}
    if encoders["int8"].backend != "onnx-int8":
        raise SystemExit("no int8 graph: run python tools/quantize_encoder.py first")
    sets = {"flickr8k-dev": load_split(args.data, "dev"), "coco-ood-dev": load_split(args.ood, "test")}
    result = {"loadavg_before": [round(x, 2) for x in os.getloadavg()], "speed": {}, "scores": {}}
    for name, records in sets.items():
        pixels = np.stack([preprocess(load_image(r.path), captioner.spec) for r in records])
        grids = {k: e.encode(pixels) for k, e in encoders.items()}
        if name == "flickr8k-dev":
            result["speed"] = {k: speed(e, pixels[:256]) for k, e in encoders.items()}
            alone = np.concatenate([encoders["int8"].encode(pixels[i:i + 1]) for i in range(16)])
            result["int8_alone_vs_batch_max_diff"] = float(np.abs(alone - grids["int8"][:16]).max())
            diff = grids["int8"] - grids["float32"]
            cos = (grids["int8"] * grids["float32"]).sum(-1) / (
                np.linalg.norm(grids["int8"], axis=-1) * np.linalg.norm(grids["float32"], axis=-1) + 1e-9)
            result["grid_error"] = {"mean_abs": round(float(np.abs(diff).mean()), 4),
                                    "mean_abs_float": round(float(np.abs(grids["float32"]).mean()), 4),
                                    "median_region_cosine": round(float(np.median(cos)), 4)}
        result["scores"][name] = {k: scores(captioner, g, records) for k, g in grids.items()}
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
