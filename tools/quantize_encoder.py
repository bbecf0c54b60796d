"""Make the shipped static-int8 encoder graph, calibrated on Flickr8k training photos.

    python tools/quantize_encoder.py [--data ../shared/flickr8k] [--photos 200]
        -> src/captioner/assets/lite2-int8.onnx (about 20 s on 2 cores)

The first `--photos` photos of the train split list, in its order, so a rerun makes the same graph. What the
int8 graph keeps and gains: `python benchmarks/int8_encoder.py`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.data.images import load_image, preprocess
from captioner.features.encoder import INT8_DIR, get_spec, quantize

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "flickr8k", help="Flickr8k root")
    ap.add_argument("--photos", type=int, default=200, help="calibration photos")
    ap.add_argument("--encoder", default="lite2")
    args = ap.parse_args()
    spec = get_spec(args.encoder)
    names = (args.data / "text" / "Flickr_8k.trainImages.txt").read_text().split()[:args.photos]
    pixels = np.stack([preprocess(load_image(args.data / "images" / n), spec)
                       for n in tqdm(names, desc="calibration photos", unit="img")])
    out = INT8_DIR / f"{spec.name}-int8.onnx"
    quantize(spec, pixels, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB), calibrated on {len(names)} train photos")


if __name__ == "__main__":
    main()
