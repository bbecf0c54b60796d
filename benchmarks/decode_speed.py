"""Decoding speed from cached features: greedy and beam search, batched vs one image at a time; the torch
search (decode.py: training, dev scoring) and the numpy search over the same torch steps (beam.py: what
Captioner runs, runtime.TorchRuntime).

    python benchmarks/decode_speed.py [--model CKPT] [--work work/flickr8k] [--images 500] [--int8]

Prints ms/image for each mode and writes benchmarks/results/decode_speed.json.
"""
import argparse
import os
import time

import torch

from captioner.checkpoint import load_checkpoint
from captioner.data.datasets import load_prepared
from captioner.decode import decode, greedy
from captioner.features.store import FeatureStore
from captioner.io import atomic_write_json
from captioner.model import int8_ranges, quantize_int8
from captioner.runtime import TorchRuntime, _torch_threads


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint (default: the shipped model)")
    ap.add_argument("--work", default="work/flickr8k", help="prepared WORKDIR with a lite2 feature store")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--single", type=int, default=50, help="images for the one-at-a-time runs")
    ap.add_argument("--int8", action="store_true", help="int8 decoder weights (what Captioner uses)")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = ap.parse_args()

    ckpt = load_checkpoint(args.model)
    data = load_prepared(args.work)
    store = FeatureStore.open(args.work, ckpt.config.encoder)
    ids = [r.image_id for r in data.split("dev") if r.image_id in store][:args.images]
    feats = torch.from_numpy(store.get(ids))
    # int8 with the activation ranges the shipped model carries (measured now for a checkpoint without them)
    ranges = ckpt.meta.get("int8_ranges") or int8_ranges(ckpt.model, feats[:256].float())
    model, vocab = (quantize_int8(ckpt.model, ranges) if args.int8 else ckpt.model), ckpt.vocab
    rows = {}
    with torch.inference_mode():
        rows["greedy, batched"] = timed(lambda: greedy(model, vocab, feats)) / len(ids)
        rows["beam 1, batched"] = timed(lambda: decode(model, vocab, feats, beam_size=1)) / len(ids)
        rows["beam 3, batched"] = timed(lambda: decode(model, vocab, feats, beam_size=3)) / len(ids)
        rows["beam 5, batched"] = timed(lambda: decode(model, vocab, feats, beam_size=5)) / len(ids)
        one = feats[:args.single]
        rows["greedy, one at a time"] = timed(lambda: [greedy(model, vocab, one[i:i + 1]) for i in range(len(one))], 1) / len(one)
        rows["beam 3, one at a time"] = timed(lambda: [decode(model, vocab, one[i:i + 1], beam_size=3) for i in range(len(one))], 1) / len(one)
    rt = TorchRuntime(ckpt, int8=args.int8, grounded=False)
    rt.model = model  # the same weights as above (ranges measured here for a checkpoint without them)
    grids = feats.float().numpy()
    one = grids[:args.single]
    # Captioner decodes on one thread (runtime._torch_threads): both searches so, side by side
    with _torch_threads(1), torch.inference_mode():
        rows["beam 3, batched, 1 thread"] = timed(lambda: decode(model, vocab, feats, beam_size=3)) / len(ids)
        rows["beam 3, one at a time, 1 thread"] = timed(
            lambda: [decode(model, vocab, feats[i:i + 1], beam_size=3) for i in range(len(one))], 1) / len(one)
    rows["beam 3, batched, numpy search, 1 thread"] = timed(
        lambda: rt.decode(grids, None, beam_size=3, max_len=30, n_best=1)) / len(ids)
    rows["beam 3, one at a time, numpy search, 1 thread"] = timed(
        lambda: [rt.decode(one[i:i + 1], None, beam_size=3, max_len=30, n_best=1) for i in range(len(one))], 1) / len(one)
    print(f"{'mode':44s} {'ms/image':>9s} {'images/s':>9s}   ({len(ids)} dev images, {torch.get_num_threads()} threads,"
          f" load {os.getloadavg()[0]:.1f})")
    for k, v in rows.items():
        print(f"{k:44s} {v * 1000:9.2f} {1 / v:9.1f}")
    atomic_write_json(args.out, {"model": str(ckpt.path), "weights": "int8" if args.int8 else "float32",
                                 "images": len(ids), "threads": torch.get_num_threads(),
                                 "loadavg": os.getloadavg()[0], "ms_per_image": {k: round(v * 1000, 3) for k, v in rows.items()}})


if __name__ == "__main__":
    main()
