"""Truthful descriptions: object hallucination (CHAIR), object recall and COCO-toolkit scores of what people are
told, on everyday photos (../shared/coco-ood-dev) and on Flickr8k dev, with and without grounding, plus the
confidence curve (share of descriptions naming a false object, among those at or above a confidence; what is
said below 0.4 starts with "Probably", see grounding.py).

    python benchmarks/truthfulness.py [--model CKPT] [--work work/flickr8k] [--beam 3]
        -> benchmarks/results/truthfulness.json, benchmarks/results/truthfulness.png

Everything goes through `captioner.evaluation.evaluate.evaluate` (the same path as `captioner evaluate` and
`captioner caption`: int8 decoder, grounding heads). About 4 min on 2 CPU cores with the feature store built
(`captioner prepare` + `captioner features`); without it the Flickr8k dev photos are encoded on the fly.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from captioner.evaluation.chair import chair
from captioner.evaluation.evaluate import evaluate, load_split

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("chair_s", "chair_i", "object_recall", "bleu4", "meteor", "cider")
LEVELS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def run(model, data, split, beam, grounded, out) -> tuple[dict, list]:
    m = evaluate(model, data, split, beam_size=beam, out=out, grounded=grounded, progress=False)
    refs = {r.image_id: r.captions for r in load_split(data, split)}
    captions = json.loads((Path(out) / "captions.json").read_text())
    # the curve is over what people are told (`text`), which `confidence` is about
    _, per = chair({c["image_id"]: c["caption"] for c in captions}, refs)
    rows = [(c.get("confidence"), bool(per[c["image_id"]]["false"])) for c in captions]
    return {k: m.get(k) for k in SHOWN}, rows


def curve(rows) -> list[dict]:
    conf = np.array([c for c, _ in rows], float)
    false = np.array([f for _, f in rows])
    return [{"confidence_at_least": q, "share_of_photos": float((conf >= q).mean()),
             "false_object_share": float(false[conf >= q].mean()) if (conf >= q).any() else None} for q in LEVELS]


def parse_args(doc: str, out: str) -> argparse.Namespace:
    """The options of the benchmarks that measure both dev sets (this one and grounding_sweep.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--work", default=str(ROOT / "work" / "flickr8k"), help="prepared Flickr8k WORKDIR")
    ap.add_argument("--ood", default=str(ROOT.parent / "shared" / "coco-ood-dev"))
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out))
    return ap.parse_args()


def main():
    args = parse_args(__doc__, "truthfulness.json")
    sets = {"coco-ood-dev": (args.ood, "test"), "flickr8k-dev": (args.work, "dev")}
    result = {"beam": args.beam, "model": args.model or "shipped", "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, split) in sets.items():
            for grounded in (False, True):
                scores, rows = run(args.model, data, split, args.beam, grounded, Path(tmp) / f"{name}-{grounded}")
                entry = {"scores": scores}
                if grounded:
                    entry["confidence_curve"] = curve(rows)
                result["sets"].setdefault(name, {})["grounded" if grounded else "plain"] = entry
                print(name, "grounded" if grounded else "plain   ",
                      "  ".join(f"{k} {100 * v:.1f}" for k, v in scores.items() if v is not None), file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    print(json.dumps(result, indent=1))


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, entry in result["sets"].items():
        pts = [p for p in entry["grounded"]["confidence_curve"] if p["false_object_share"] is not None]
        ax.plot([p["confidence_at_least"] for p in pts], [100 * p["false_object_share"] for p in pts], "o-", label=name)
    ax.set_xlabel("confidence at least")
    ax.set_ylabel("descriptions naming a false object (%)")
    ax.set_title("Descriptions at or above a confidence")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
