"""Does reading the next batch while this one is captioned make folders faster? (apps/readahead.py)

    python benchmarks/readahead.py [--images 500] [--rounds 3] --out benchmarks/results/readahead.json

Captions the same Flickr8k dev photos (files, beam 3, batches of 16, the shipped model loaded once) in
alternating rounds: one batch after another through `Captioner.caption_batch(paths)` (what `captioner caption`
did), and through `readahead.caption_paths` (threads read and resize later batches meanwhile). Reports
images/s per round, the load average with each, and whether every caption agrees between the two.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import FLICKR8K, dev_photos  # noqa: E402

from captioner.apps.api import Captioner  # noqa: E402
from captioner.apps.readahead import caption_paths  # noqa: E402
from captioner.io import atomic_write_json  # noqa: E402


def sequential(c, paths, batch_size):
    return [r for i in range(0, len(paths), batch_size) for r in c.caption_batch(paths[i:i + batch_size])]


def overlapped(c, paths, batch_size):
    return [r for _, results in caption_paths(c, paths, batch_size) for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FLICKR8K)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/readahead.json"))
    args = ap.parse_args()
    c = Captioner.load()
    paths = dev_photos(args.data, args.images)
    overlapped(c, paths[:32], args.batch_size)  # warm-up: lazy init in onnxruntime and torch
    runs, captions = [], {}
    for k in range(args.rounds):
        for name, fn in (("sequential", sequential), ("read_ahead", overlapped)) if k % 2 == 0 else \
                        (("read_ahead", overlapped), ("sequential", sequential)):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            results = fn(c, paths, args.batch_size)
            s = time.perf_counter() - t0
            captions.setdefault(name, [(r.text, r.caption, r.score, r.confidence) for r in results])
            runs.append({"way": name, "round": k, "images_per_s": round(len(paths) / s, 1),
                         "loadavg_1min": round(load, 2)})
            print(f"round {k} {name:<10} {len(paths) / s:6.1f} images/s  load average {load:.2f}", flush=True)
    mean = {w: round(sum(r["images_per_s"] for r in runs if r["way"] == w) / args.rounds, 1)
            for w in ("sequential", "read_ahead")}
    differ = sum(a != b for a, b in zip(captions["sequential"], captions["read_ahead"]))
    result = {"images": len(paths), "batch_size": args.batch_size, "beam": c.beam_size, "runs": runs,
              "mean_images_per_s": mean, "captions_differ": differ, "cpus": os.cpu_count()}
    atomic_write_json(args.out, result)
    print(f"mean images/s: sequential {mean['sequential']}, read-ahead {mean['read_ahead']}; "
          f"{differ} of {len(paths)} captions differ; wrote {args.out}")


if __name__ == "__main__":
    main()
