"""How fast does `captioner caption DIR --ray` caption a folder, with 1 and 2 workers? (apps/scale.py)

    python benchmarks/ray_throughput.py [--images 200] [--workers 1 2] --out benchmarks/results/ray_throughput.json

Starts one local Ray instance (`--cpus`, 2), then for each worker count captions the same Flickr8k dev photos
into a fresh JSONL file with `scale.caption_to_jsonl` (batches of 16, beam 3, the shipped model, each worker
reserving cpus/workers cores) and times it end to end, the workers' start-up (each loads the model) included;
for reference, the same photos in this process with `Captioner.caption_batch`, model loaded beforehand.
Checks that every run wrote one record per photo with the single-process caption. On a real cluster the
figure scales with nodes; here all workers share the same 2 cores, so it shows Ray's overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import FLICKR8K, dev_photos  # noqa: E402

from captioner.apps import scale  # noqa: E402
from captioner.apps.api import Captioner  # noqa: E402
from captioner.io import atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=FLICKR8K)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cpus", type=int, default=2, help="cores of the local Ray instance (2)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_throughput.json"))
    args = ap.parse_args()
    import ray

    paths = [str(p) for p in dev_photos(args.data, args.images)]
    c = Captioner.load()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    expected = {p: r.text for i in range(0, len(paths), 16) for p, r in zip(paths[i:i + 16],
                                                                            c.caption_batch(paths[i:i + 16]))}
    single = {"images_per_s": round(len(paths) / (time.perf_counter() - t0), 1), "loadavg_1min": round(load, 2)}
    print(f"single process: {single['images_per_s']} images/s, load average {load:.2f}", flush=True)
    del c

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start_s = round(time.perf_counter() - t0, 1)
    runs = []
    try:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "results.jsonl"
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                stats = scale.caption_to_jsonl(paths, out, workers=workers, num_cpus=args.cpus, progress=False)
                s = time.perf_counter() - t0
                records = [json.loads(line) for line in out.read_text().splitlines()]
            differ = sum(r["text"] != expected[r["path"]] for r in records)
            runs.append({"workers": workers, "seconds": round(s, 1), "images_per_s": round(len(paths) / s, 1),
                         "written": stats["written"], "captions_differ": differ, "loadavg_1min": round(load, 2)})
            print(f"{workers} worker(s): {len(paths) / s:.1f} images/s ({s:.1f} s with start-up), "
                  f"{stats['written']} written, {differ} differ, load average {load:.2f}", flush=True)
    finally:
        ray.shutdown()
    atomic_write_json(args.out, {"images": len(paths), "cpus": args.cpus, "machine_cpus": os.cpu_count(),
                                 "ray_start_s": ray_start_s, "single_process": single, "ray": runs})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
