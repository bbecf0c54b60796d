"""Image search by caption on Flickr8k dev, against Karpathy & Fei-Fei (2015) Table 1.

The 1,000 dev images are captioned into a photo library (captioner.apps.library); each of their 5,000
reference captions is then a query, and we report Recall@1/5/10 and the median rank of the right image.
The published row is a joint image-sentence embedding model; ours ranks generated captions by text
(FTS5 bm25), so it measures how searchable the captions are.

    .venv/bin/python benchmarks/retrieval.py [--model CKPT] [--out runs/retrieval]

The library is kept in OUT and indexing is incremental, so a second run with the same model reuses it.
Images a query matches no word of share the ranks after the matched ones (their expected rank is used).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from captioner.apps.library import WEIGHTS, index_folder, rank_many
from captioner.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = {"R@1": 11.8, "R@5": 32.1, "R@10": 44.7, "median rank": 12.4}  # Karpathy & Fei-Fei 2015, Table 1
# (search mode, bm25 weights for caption / other n-best captions / tags); the first is the library default
SETTINGS = [("or", WEIGHTS), ("or", (1.0, 1.0, 1.0)), ("or", (1.0, 0.0, 0.0)), ("or", (4.0, 2.0, 1.0)),
            ("or", (2.0, 1.0, 4.0)), ("or-all", WEIGHTS), ("and", WEIGHTS)]


def dev_queries(data: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The dev image names present on disk and their (image, reference caption) pairs."""
    names = (data / "text" / "Flickr_8k.devImages.txt").read_text().split()
    present = [n for n in names if (data / "images" / n).is_file()]
    if len(present) < len(names):
        print(f"{len(names) - len(present)} dev images named but absent: left out", file=sys.stderr)
    keep = set(present)
    pairs = []
    for line in (data / "text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        name = key.split("#")[0]
        if name in keep and caption.strip():
            pairs.append((name, caption.strip()))
    return present, pairs


def link_folder(data: Path, names: list[str], folder: Path) -> None:
    """A folder of symlinks holding exactly the dev images, so index_folder sees just them."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        link = folder / n
        if not link.is_symlink():
            link.symlink_to((data / "images" / n).resolve())


def score(ranked: list[list[str]], targets: list[str], n_images: int) -> dict:
    ranks = []
    for paths, target in zip(ranked, targets):
        if target in paths:
            ranks.append(paths.index(target) + 1)
        else:  # unmatched images tie after the matched ones: use the middle of that block
            ranks.append(len(paths) + (n_images - len(paths) + 1) / 2)
    n = len(ranks)
    return {"R@1": 100 * sum(r <= 1 for r in ranks) / n, "R@5": 100 * sum(r <= 5 for r in ranks) / n,
            "R@10": 100 * sum(r <= 10 for r in ranks) / n, "median rank": statistics.median(ranks),
            "no match": 100 * sum(t not in p for p, t in zip(ranked, targets)) / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "flickr8k")
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--n-best", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "retrieval")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()  # the library stores absolute paths

    from captioner.apps.api import Captioner
    captioner = Captioner.load(args.model, beam_size=args.beam)
    model = str(captioner.info.get("name", "model"))
    names, pairs = dev_queries(args.data)
    folder = args.out / "dev-images"
    link_folder(args.data, names, folder)
    db = args.out / f"dev-{model}-beam{args.beam}-n{args.n_best}.sqlite"

    t0 = time.perf_counter()
    summary = index_folder(folder, db, captioner, beam_size=args.beam, n_best=args.n_best)
    index_s = time.perf_counter() - t0
    print(f"indexed {summary['found']} images ({summary['captioned']} captioned now, {summary['failed']} failed) "
          f"in {index_s:.1f}s with {model}")

    queries = [c for _, c in pairs]
    targets = [str(folder / n) for n, _ in pairs]
    rows = []
    for mode, weights in tqdm(SETTINGS, desc="ranking", unit="setting"):
        t0 = time.perf_counter()
        ranked = rank_many(db, queries, mode=mode, weights=weights)
        rows.append({"mode": mode, "weights": list(weights), **score(ranked, targets, len(names)),
                     "ms_per_query": 1000 * (time.perf_counter() - t0) / len(queries)})

    print(f"\nFlickr8k dev image search, {len(queries)} queries over {len(names)} images "
          f"(model {model}, beam {args.beam}, n-best {args.n_best})")
    print(f"{'setting':<28} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'med r':>6} {'no match':>9} {'ms/q':>6}")
    print(f"{'Karpathy & Fei-Fei 2015':<28} {PUBLISHED['R@1']:>6.1f} {PUBLISHED['R@5']:>6.1f} "
          f"{PUBLISHED['R@10']:>6.1f} {PUBLISHED['median rank']:>6.1f} {'':>9} {'':>6}")
    for r in rows:
        label = f"{r['mode']} w={tuple(r['weights'])}"
        print(f"{label:<28} {r['R@1']:>6.1f} {r['R@5']:>6.1f} {r['R@10']:>6.1f} {r['median rank']:>6.1f} "
              f"{r['no match']:>8.1f}% {r['ms_per_query']:>6.2f}")
    result = {"model": model, "model_info": {k: v for k, v in captioner.info.items() if k != "dev_scores"},
              "beam_size": args.beam, "n_best": args.n_best, "images": len(names), "queries": len(queries),
              "index_seconds": round(index_s, 1), "published": PUBLISHED, "settings": rows}
    atomic_write_json(args.out / "retrieval.json", result)
    print(f"wrote {args.out / 'retrieval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
