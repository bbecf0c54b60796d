"""Turn a training checkpoint into the shipped model: float16 weights, dev scores in its metadata.

    python tools/ship_model.py runs/f8k-a/best.safetensors --work work/flickr8k \
        --out src/captioner/assets/flickr8k-sat.safetensors

The float16 file itself is evaluated on the dev split (greedy, beam 3, beam 5; full COCO-toolkit
metrics, reports in runs/ship/), so the scores it carries are the scores of exactly what ships.
"""
import argparse
import json
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.evaluation.evaluate import evaluate

KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--work", default="work/flickr8k")
    ap.add_argument("--out", default="src/captioner/assets/flickr8k-sat.safetensors")
    ap.add_argument("--name", default="flickr8k-sat")
    ap.add_argument("--reports", default="runs/ship")
    args = ap.parse_args()

    src = load_checkpoint(args.checkpoint)
    meta = {**src.meta, "name": args.name, "source_checkpoint": str(args.checkpoint)}
    tmp = Path(args.reports) / "candidate.safetensors"
    save_checkpoint(tmp, src.model, src.vocab, src.config, meta, dtype=torch.float16)

    scores = {}
    for beam in (1, 3, 5):
        m = evaluate(tmp, args.work, "dev", beam_size=beam, out=Path(args.reports) / f"dev-beam{beam}")
        scores["greedy" if beam == 1 else f"beam{beam}"] = {k: round(m[k], 4) for k in KEYS if m.get(k) is not None}
    meta["dev_scores"] = scores
    save_checkpoint(args.out, load_checkpoint(tmp).model, src.vocab, src.config, meta, dtype=torch.float16)
    print(json.dumps(scores, indent=2))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
