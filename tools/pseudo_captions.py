"""Self-training data (issue 21, lever 6): a copy of a prepared WORKDIR whose train photos also learn from a
model's own confident captions.

    python tools/pseudo_captions.py runs/scst-concepts/best.safetensors --work work/flickr8k \
        --out work/flickr8k-self [--keep 0.5] [--beam 3]

The teacher decodes every train photo's cached grid (beam search, the float model); the captions with the
highest mean log-probability per word (the `--keep` share) are added to that photo's training captions as one
more tokenised caption. The references (`captions`) stay the human ones, so dev scoring and the self-critical
reward are unchanged; dev and test photos are not touched. The vocabulary and the feature store are the
source's (the store is linked, not copied), so a model trained here decodes like any other. About 2 min on 2
CPU cores.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner.checkpoint import load_checkpoint
from captioner.data.datasets import load_prepared
from captioner.decode import decode
from captioner.features.store import FeatureStore
from captioner.io import atomic_write_text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", help="checkpoint whose captions are added")
    ap.add_argument("--work", default="work/flickr8k")
    ap.add_argument("--out", default="work/flickr8k-self")
    ap.add_argument("--keep", type=float, default=0.5, help="share of train photos whose pseudo-caption is kept")
    ap.add_argument("--beam", type=int, default=3)
    args = ap.parse_args()

    teacher = load_checkpoint(args.teacher)
    data = load_prepared(args.work)
    if teacher.vocab != data.vocab:
        raise SystemExit(f"{args.teacher}: its vocabulary is not {args.work}'s")
    store = FeatureStore.open(args.work, teacher.config.encoder)
    train = [r.image_id for r in data.split("train") if r.image_id in store]
    pseudo = {}
    with torch.inference_mode():
        for i in tqdm(range(0, len(train), 250), desc="teacher captions", unit="batch"):
            ids = train[i:i + 250]
            for image_id, hyps in zip(ids, decode(teacher.model, teacher.vocab, torch.from_numpy(store.get(ids)),
                                                  beam_size=args.beam)):
                pseudo[image_id] = (hyps[0].score / (len(hyps[0].tokens) + 1), hyps[0].tokens)
    cut = np.quantile([s for s, _ in pseudo.values()], 1 - args.keep)
    kept = {k: toks for k, (s, toks) in pseudo.items() if s >= cut}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in data.records:
        tokens = data.tokens[r.image_id] + ([kept[r.image_id]] if r.image_id in kept else [])
        lines.append(json.dumps({"image_id": r.image_id, "path": str(r.path) if r.path else None, "split": r.split,
                                 "captions": r.captions, "tokens": tokens}, ensure_ascii=False))
    atomic_write_text(out / "dataset.jsonl", "\n".join(lines) + "\n")
    for name in ("vocab.json", "summary.json"):
        shutil.copyfile(Path(args.work) / name, out / name)
    if not (out / "features").exists():
        (out / "features").symlink_to((Path(args.work) / "features").resolve(), target_is_directory=True)
    print(f"{out}: {len(kept)} of {len(train)} train photos got a pseudo-caption (mean log-probability per word "
          f">= {cut:.3f}), e.g. {' '.join(next(iter(kept.values())))!r}")


if __name__ == "__main__":
    main()
