"""JPEG draft decoding of large photos: reduce to 2x the encoder input (DECODE_SIDE = 520, what load_image does)
or right down to the input (260)? Speed of reading, and Flickr8k dev scores.

    python benchmarks/draft.py [--images 1000] [--scale 8] --out benchmarks/results/draft.json

The shared Flickr8k photos are at most 224 px, so no draft setting changes a single pixel of them (nor of the
feature store): both settings give today's dev scores. To see what draft does to a large photo, each dev photo
is enlarged `--scale` times (bicubic, JPEG quality 92, in memory: 224x168 -> 1792x1344) and then read with
the shorter side reduced at decode time to no less than 520 (DCT 1/2 here) or 260 (DCT 1/4), resized to the
input, encoded and captioned (beam 3, grounded, the shipped model, batches of 16). Reports the median
read+resize ms of each (timed alternately, photo by photo), BLEU-4 and CIDEr-D of both against the dev
references (COCO toolkit, x100), the original 224-px photos' scores, and how many captions differ.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.apps.api import Captioner
from captioner.data.datasets import load_prepared
from captioner.data.images import load_image, preprocess
from captioner.evaluation.metrics import score_captions
from captioner.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("work/flickr8k"), help="prepared Flickr8k (references)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/draft.json"))
    args = ap.parse_args()
    records = [r for r in load_prepared(args.work).split("dev") if r.path][:args.images]
    c = Captioner.load()
    spec, sides = c.spec, {"original": None, "draft_520": 520, "draft_260": 260}
    captions = {k: {} for k in sides}
    read_ms = {k: [] for k in sides}
    load = [os.getloadavg()[0]]
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        pixels = {k: [] for k in sides}
        for r in chunk:
            pixels["original"].append(preprocess(load_image(r.path), spec))
            img = load_image(r.path)
            buf = io.BytesIO()
            img.resize((img.width * args.scale, img.height * args.scale), Image.BICUBIC).save(buf, "JPEG",
                                                                                            quality=92)
            data = buf.getvalue()
            for k in ("draft_520", "draft_260") if start % 32 == 0 else ("draft_260", "draft_520"):
                t0 = time.perf_counter()
                pixels[k].append(preprocess(load_image(data, min_side=sides[k]), spec))
                read_ms[k].append((time.perf_counter() - t0) * 1000)
        for k in sides:
            for r, res in zip(chunk, c.caption_features(c.encoder.encode(np.stack(pixels[k])))):
                captions[k][r.image_id] = res.text
        if start % 160 == 0:
            load.append(os.getloadavg()[0])
            print(f"{start + len(chunk)} of {len(records)}", flush=True)
    refs = {r.image_id: r.captions for r in records}
    result = {"images": len(records), "scale": args.scale, "large_size_example": [224 * args.scale, 168 * args.scale],
              "loadavg_1min": [round(x, 2) for x in load], "ways": {}}
    for k in sides:
        s = score_captions(captions[k], refs, meteor=False)
        result["ways"][k] = {"BLEU-4": round(100 * s.corpus["bleu4"], 2), "CIDEr-D": round(100 * s.corpus["cider"], 2),
                             "read_resize_median_ms": round(float(np.median(read_ms[k])), 2) if read_ms[k] else None,
                             "captions_differ_from_original": sum(captions[k][i] != captions["original"][i]
                                                                  for i in refs)}
        print(k, result["ways"][k])
    result["captions_differ_520_vs_260"] = sum(captions["draft_520"][i] != captions["draft_260"][i] for i in refs)
    atomic_write_json(args.out, result)
    print(f"520 vs 260: {result['captions_differ_520_vs_260']} captions differ; wrote {args.out}")


if __name__ == "__main__":
    main()
