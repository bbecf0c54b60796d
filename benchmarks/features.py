"""Encoder throughput on this machine, torch vs onnxruntime, on real Flickr8k photos.

    .venv/bin/python benchmarks/features.py [--images 256] [--batch-size 32] [--encoder lite2]
        [--log work/logs/features-lite2.log]

Throughput counts decoding + preprocessing + the network (what `captioner features` does per
image), not loading the model. --log reads the wall time and peak RSS of a full
`/usr/bin/time -v captioner features WORKDIR` run from its log. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.data.images import load_image, preprocess
from captioner.features.encoder import Encoder

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


def throughput(name: str, backend: str, paths: list[Path], batch_size: int) -> dict:
    enc = Encoder.load(name, backend)
    enc.encode(np.zeros((2, 3, enc.spec.input_size, enc.spec.input_size), np.float32))  # warm-up
    t = time.perf_counter()
    for i in tqdm(range(0, len(paths), batch_size), desc=f"{name}/{backend}", unit="batch"):
        batch = np.stack([preprocess(load_image(p), enc.spec) for p in paths[i:i + batch_size]])
        enc.encode(batch)
    seconds = time.perf_counter() - t
    return {"backend": backend, "images": len(paths), "seconds": round(seconds, 2),
            "images_per_s": round(len(paths) / seconds, 1)}


def full_run(log: Path) -> dict:
    """Wall time, peak RSS and the summary line of a `/usr/bin/time -v captioner features` log."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    summary = [line for line in text.splitlines() if "images stored" in line]
    out = {"log": str(log), "summary": summary[-1] if summary else None}
    if wall:
        h, m, s = wall.groups()
        out["wall_s"] = round(int(h or 0) * 3600 + int(m) * 60 + float(s), 1)
    if rss:
        out["peak_rss_mib"] = round(int(rss.group(1)) / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--encoder", default="lite2")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--log", type=Path, help="log of a full `/usr/bin/time -v captioner features` run")
    args = ap.parse_args()

    paths = sorted((FLICKR8K / "images").glob("*.jpg"))[: args.images]
    if not paths:
        raise SystemExit(f"{FLICKR8K / 'images'}: no images")
    result = {"encoder": args.encoder, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
              "batch_size": args.batch_size,
              "throughput": [throughput(args.encoder, b, paths, args.batch_size) for b in args.backends.split(",")]}
    if args.log:
        result["full_run"] = full_run(args.log)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
