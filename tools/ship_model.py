"""Turn a training checkpoint into the shipped model: float16 weights, the grounding heads, the int8 activation
ranges, and its scores in its metadata.

    python tools/ship_model.py runs/scst/best.safetensors --work work/flickr8k \
        --out src/captioner/assets/flickr8k-sat.safetensors [--ood ../shared/coco-ood-dev]

Steps (about 4 min on 2 CPU cores with the feature store built): the evidence head is trained on the train
split's cached grids and captions (grounding.fit_grounding, seconds), the LSTM input range for int8 decoding
is measured on 256 train grids (model.int8_ranges), then the float16 candidate file itself is evaluated with
`captioner evaluate`'s code (the path users run: int8, grounded) on the dev split at greedy, beam 3 and beam 5,
and on the out-of-domain set at beam 3, so the scores it carries are those of exactly what ships.

A model on Lite2 at another input size (`encoder = "lite2@320"`) needs WORKDIR's `lite2` store too (the ImageNet
classifier is matched to its grids: grounding.match_classifier) and, for int8 photos, its own int8 encoder graph
(`python tools/quantize_encoder.py --encoder lite2@320`); other encoders ship without grounding heads.

    python tools/ship_model.py src/captioner/assets/flickr8k-sat.safetensors --settings-only
re-measures the shipped model with the current grounding settings (grounding.GroundingSettings) written into it,
when only the decisions on the heads' outputs changed (about 3 min).
"""
import argparse
import json
from pathlib import Path

import torch

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.evaluation.chair import CHAIR_KEYS
from captioner.evaluation.evaluate import evaluate
from captioner.evaluation.metrics import METRIC_KEYS
from captioner.features.store import FeatureStore
from captioner.grounding import GroundingSettings, fit_grounding, has_imagenet_grid
from captioner.model import int8_ranges

KEYS = METRIC_KEYS + CHAIR_KEYS


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--work", default="work/flickr8k")
    ap.add_argument("--out", default="src/captioner/assets/flickr8k-sat.safetensors")
    ap.add_argument("--name", default="flickr8k-sat")
    ap.add_argument("--reports", default="runs/ship")
    ap.add_argument("--ood", default="../shared/coco-ood-dev", help="out-of-domain dev set (CSV layout)")
    ap.add_argument("--settings-only", action="store_true",
                    help="CHECKPOINT is a shipped model: keep its weights, heads and int8 ranges, write today's "
                         "GroundingSettings defaults into it and measure it again")
    args = ap.parse_args()

    src = load_checkpoint(args.checkpoint)
    if args.settings_only:  # a shipped model: same weights, heads and int8 ranges, today's decisions
        if src.grounding is None or "int8_ranges" not in src.meta:
            raise SystemExit(f"{args.checkpoint}: --settings-only needs a shipped model (grounding heads, int8 ranges)")
        grounding, fit = src.grounding, None
        grounding.settings = GroundingSettings(person_odds=grounding.settings.person_odds,  # fitted, kept
                                                concept_presence=grounding.settings.concept_presence)
        meta = {**src.meta, "name": args.name}
    else:
        grounding, fit = (fit_grounding(args.work, encoder=src.config.encoder) if has_imagenet_grid(src.config.encoder)
                          else (None, None))
        store = FeatureStore.open(args.work, src.config.encoder)
        calibration = torch.from_numpy(store.get(store.ids[:256])).float()
        meta = {**src.meta, "name": args.name, "source_checkpoint": str(args.checkpoint),
                "int8_ranges": int8_ranges(src.model, calibration)}
    if fit:
        meta["grounding_fit"] = {"train_images": fit["train_images"], "classes_learnt": fit["learnt"]}
    tmp = Path(args.reports) / "candidate.safetensors"
    save_checkpoint(tmp, src.model, src.vocab, src.config, meta, dtype=torch.float16, grounding=grounding)

    scores = {}
    for beam in (1, 3, 5):
        m = evaluate(tmp, args.work, "dev", beam_size=beam, out=Path(args.reports) / f"dev-beam{beam}")
        scores["greedy" if beam == 1 else f"beam{beam}"] = {k: round(m[k], 4) for k in KEYS if m.get(k) is not None}
    meta["dev_scores"] = scores
    if args.ood and Path(args.ood).is_dir():
        m = evaluate(tmp, args.ood, "test", beam_size=3, out=Path(args.reports) / "ood-beam3")
        meta["ood_scores"] = {"data": Path(args.ood).name,
                              "beam3": {k: round(m[k], 4) for k in KEYS if m.get(k) is not None}}
    final = load_checkpoint(tmp)
    save_checkpoint(args.out, final.model, src.vocab, src.config, meta, dtype=torch.float16, grounding=final.grounding)
    print(json.dumps({k: meta[k] for k in ("dev_scores", "ood_scores") if k in meta}, indent=2))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
