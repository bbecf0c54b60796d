"""Grounding settings, one change at a time: CHAIR-s, CHAIR-i, object recall, BLEU-4 and CIDEr-D of what people
are told on ../shared/coco-ood-dev and on Flickr8k dev, for the shipped settings and for each lever switched off
or set another way (grounding.GroundingSettings). It shows what each part of the grounded description buys.

    python benchmarks/grounding_sweep.py [--model CKPT] [--work work/flickr8k] [--beam 3]
        -> benchmarks/results/grounding_sweep.json and a Markdown table on stdout

Goes through `Captioner.caption_features` (the path every surface uses: int8 decoder, grounding heads); the
photos are encoded once by the captioner's encoder (int8 by default; with the float one the Flickr8k dev grids come
from the feature store of `captioner prepare` + `captioner features`). METEOR is left out (its JVM is slow to start). About 6 min on 2 CPU cores.
"""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.apps.api import Captioner
from captioner.evaluation.chair import chair
from captioner.evaluation.evaluate import load_split
from captioner.evaluation.metrics import score_captions
from captioner.features.store import FeatureStore
from truthfulness import parse_args  # benchmarks/ is on the path when a script in it runs

VARIANTS = {
    "shipped settings": {},
    "previous settings (no objects from the region windows; person banned under 0.25; missed objects added from "
    "0.3 on unfamiliar photos)": dict(add_regions=1.01, ban_class={"dog": 0.5}, add_unfamiliar=0.3),
    "familiar from 0.38": dict(familiar_above=0.38),
    "missed objects added from 0.3 on unfamiliar photos (not 0.5)": dict(add_unfamiliar=0.3),
    "no ban, no hedge, nothing added (the evidence as a soft bias alone)":
        dict(ban_below=0.0, ban_unfamiliar=0.0, ban_class={}, hedge_below=0.0, add_concepts=1.01, add_unfamiliar=1.01),
    "one ban level for every photo (0.25)": dict(ban_unfamiliar=0.25, ban_class={}),
    "one ban level for every photo (0.5)": dict(ban_below=0.5, ban_unfamiliar=0.5, ban_class={}),
    "familiarity from the grid alone (no object close-up rule)": dict(object_photo_above=1.01),
    "no extra evidence asked of dogs or people": dict(ban_class={}),
    "no extra evidence asked of people (person banned under 0.25, not 0.4)": dict(ban_class={"dog": 0.5}),
    "no objects from the region windows": dict(add_regions=1.01),
    "objects from the region windows from 0.3 (not 0.4)": dict(add_regions=0.3),
    "two missed objects added (not one)": dict(add_most=2),
    "no \"Probably\" under confidence 0.4": dict(hedge_below=0.0),
    "no missed object added": dict(add_concepts=1.01, add_unfamiliar=1.01),
    "missed objects added from 0.2 on unfamiliar photos": dict(add_unfamiliar=0.2),
    "a sentence naming nothing says the concepts from 0.2 (not 0.3)": dict(maybe_above=0.2),
    "concept words favoured by 3 x their probability (not 1 x)": dict(boost=3.0),
}


def grids_of(captioner: Captioner, name: str, data: str, split: str, work: str):
    records = load_split(data, split)
    ids = [r.image_id for r in records]
    if name == "flickr8k-dev" and not captioner.int8_encoder:  # the store holds the float encoder's grids
        return ids, FeatureStore.open(work, captioner.spec.name).get(ids), {r.image_id: r.captions for r in records}
    grids = np.concatenate([captioner.encoder.encode_images([r.path for r in records[i:i + 25]])
                            for i in range(0, len(records), 25)])
    return ids, grids, {r.image_id: r.captions for r in records}


def measure(captioner, ids, grids, refs, beam: int) -> dict:
    texts = {}
    for i in range(0, len(ids), 100):
        for k, r in zip(ids[i:i + 100], captioner.caption_features(grids[i:i + 100], beam_size=beam)):
            texts[k] = r.text
    hallucination, _ = chair(texts, refs)
    scores = score_captions(texts, refs, meteor=False).corpus
    return {k: round(100 * v, 1) for k, v in {**hallucination, "bleu4": scores["bleu4"], "cider": scores["cider"]}.items()}


def main():
    args = parse_args(__doc__, "grounding_sweep.json")
    captioner = Captioner.load(args.model)
    if captioner.describer is None:
        raise SystemExit(f"{args.model}: this model has no grounding heads")
    shipped = captioner.describer.settings
    sets = {name: grids_of(captioner, name, data, split, args.work)
            for name, data, split in (("coco-ood-dev", args.ood, "test"), ("flickr8k-dev", args.work, "dev"))}
    rows = []
    for label, change in tqdm(VARIANTS.items(), desc="settings", unit="variant"):
        captioner.describer.settings = replace(shipped, **change)
        rows.append({"variant": label, "change": change,
                     **{name: measure(captioner, *s, args.beam) for name, s in sets.items()}})
    captioner.describer.settings = shipped
    Path(args.out).write_text(json.dumps({"beam": args.beam, "model": args.model or "shipped", "rows": rows},
                                         indent=1) + "\n")
    keys = ("chair_s", "chair_i", "object_recall", "bleu4", "cider")
    print("| settings | " + " | ".join(f"COCO {k}" for k in keys) + " | " + " | ".join(f"F8k {k}" for k in keys) + " |")
    print("|---" * (1 + 2 * len(keys)) + "|")
    for r in rows:
        print(f"| {r['variant']} | " + " | ".join(str(r["coco-ood-dev"][k]) for k in keys) + " | "
              + " | ".join(str(r["flickr8k-dev"][k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
