"""Decoding levers on the dev split: models x beam sizes x length normalisation x repeat penalty, one table.

    python benchmarks/levers.py --models runs/a/best.safetensors runs/b/best.safetensors \
        [--beams 1 3 5] [--length-norms 0 0.5 1] [--repeat-penalties 0 2] [--meteor] [--int8]
        [--combine ensemble|average] [--out benchmarks/results/levers.json]

--combine decodes the --models as one: `ensemble` averages their word probabilities at every step,
`average` averages their weights (checkpoint averaging; they must share a starting point to make sense).

Decodes the cached dev features of WORKDIR (no image is re-encoded) and scores every configuration with
the COCO-toolkit scorers (`score_captions`, the same code as `captioner evaluate`). METEOR needs Java and
adds ~10 s per row, so it is off unless asked for.
"""
import argparse
import os
import time

import torch

from captioner.checkpoint import load_checkpoint
from captioner.data.datasets import load_prepared
from captioner.decode import REPEAT_PENALTY, Ensemble, decode
from captioner.evaluation.metrics import METRIC_KEYS, score_captions
from captioner.features.store import FeatureStore
from captioner.io import atomic_write_json
from captioner.model import ShowAttendTell, int8_ranges, quantize_int8


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[None], help="checkpoints (default: the shipped model)")
    ap.add_argument("--work", default="work/flickr8k", help="prepared WORKDIR with a feature store")
    ap.add_argument("--beams", nargs="+", type=int, default=[1, 3, 5])
    ap.add_argument("--length-norms", nargs="+", type=float, default=[0.0])
    ap.add_argument("--repeat-penalties", nargs="+", type=float, default=[REPEAT_PENALTY],
                    help="what saying a word again costs (decode.decode's repeat_penalty; 0: nothing)")
    ap.add_argument("--meteor", action="store_true")
    ap.add_argument("--int8", action="store_true", help="also decode with int8 weights (what Captioner uses)")
    ap.add_argument("--combine", choices=["ensemble", "average"], help="decode all --models as one")
    ap.add_argument("--out", default="benchmarks/results/levers.json")
    args = ap.parse_args()

    data = load_prepared(args.work)
    rows = []
    checkpoints = [load_checkpoint(p) for p in args.models]
    entries = [(str(c.path), c.model, c) for c in checkpoints]  # (label, model to decode, its checkpoint)
    if args.combine:
        first = checkpoints[0]
        if any(c.vocab != first.vocab for c in checkpoints):
            raise SystemExit("--combine needs models with one vocabulary")
        if args.combine == "ensemble":
            model = Ensemble([c.model for c in checkpoints])
        else:
            model = ShowAttendTell(first.config, len(first.vocab))
            states = [c.model.state_dict() for c in checkpoints]
            model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
        entries = [(f"{args.combine} of " + " + ".join(label for label, _, _ in entries), model.eval(), first)]
    for label, base, ckpt in entries:
        store = FeatureStore.open(args.work, ckpt.config.encoder)
        records = [r for r in data.split("dev") if r.image_id in store]
        ids = [r.image_id for r in records]
        refs = {r.image_id: r.captions for r in records}
        feats = torch.from_numpy(store.get(ids))
        ranges = ckpt.meta.get("int8_ranges") or int8_ranges(base, feats[:256].float())
        weights = [("float32", base)] + ([("int8", quantize_int8(base, ranges))] if args.int8 else [])
        for (kind, model), beam, penalty in ((w, b, p) for w in weights for b in args.beams
                                             for p in args.repeat_penalties):
            for norm in args.length_norms if beam > 1 else [0.0]:
                t = time.perf_counter()
                with torch.inference_mode():
                    caps = [c[0] for i in range(0, len(ids), 250)
                            for c in decode(model, ckpt.vocab, feats[i:i + 250], beam_size=beam, length_norm=norm,
                                            repeat_penalty=penalty)]
                secs = time.perf_counter() - t
                scores = score_captions({k: c.text for k, c in zip(ids, caps)}, refs, meteor=args.meteor)
                row = {"model": label, "weights": kind, "beam": beam, "length_norm": norm, "repeat_penalty": penalty,
                       "images": len(ids), "decode_secs": round(secs, 1), **{k: scores.corpus[k] for k in METRIC_KEYS}}
                rows.append(row)
                print(f"{label[-50:]:50s} {kind:7s} beam {beam} norm {norm:3.1f} repeat {penalty:3.1f}  " + "  ".join(
                    f"{k} {100 * v:5.1f}" for k, v in scores.corpus.items() if v is not None), flush=True)
    atomic_write_json(args.out, {"work": args.work, "split": "dev", "loadavg": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
