"""How fast is "caption this photo"? Latency at batch 1, folder throughput, model load time, peak memory.

    python benchmarks/latency.py [--no-int8] [--plain] [--runtime onnx --model FOLDER] --out benchmarks/results/latency.json

`--runtime onnx` with a model folder (`captioner export FOLDER`) measures the torch-free install's path.

1. load: Captioner.load() wall time (checkpoint + CNN; the ONNX export is cached, so not included).
2. latency: JPEG file -> caption, one image at a time (batch 1, beam 3) on Flickr8k dev photos; median/p95 ms,
   plus where that time goes: reading+resizing, the CNN encoder, and the LSTM beam search.
3. throughput: `captioner caption FOLDER` (the CLI's own code path, batched) on a folder of Flickr8k dev
   photos; images per second, model load excluded.
4. peak RSS of the whole process (resource.getrusage).
The machine's load average is recorded next to the numbers: on a shared 2-core box it moves them a lot.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from importlib import metadata

import numpy as np
from tqdm import tqdm

from captioner.apps import cli
from captioner.apps.api import Captioner
from captioner.data.images import load_image, preprocess
from captioner.io import atomic_write_json

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "flickr8k"


def dev_photos(root: Path, n: int, skip: int = 0) -> list[Path]:
    names = (root / "text" / "Flickr_8k.devImages.txt").read_text().split()
    present = [root / "images" / x for x in names if (root / "images" / x).is_file()]
    if len(present) < skip + n:
        sys.exit(f"{root}: only {len(present)} dev images present, need {skip + n}")
    return present[skip:skip + n]


def ms_stats(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"median_ms": round(float(np.median(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def latency(c: Captioner, photos: list[Path], beam: int, warmup: int) -> dict:
    for p in photos[:warmup]:  # first calls pay for lazy init in onnxruntime and torch
        c.caption(p, beam_size=beam)
    total, read, enc, dec, words = [], [], [], [], []
    for p in tqdm(photos, desc="latency", unit="img", file=sys.stderr):
        t0 = time.perf_counter()
        r = c.caption(p, beam_size=beam)
        total.append(time.perf_counter() - t0)
        words.append(len(r.tokens))
        # the same three stages again, timed one by one (mirrors Captioner.caption_batch)
        t0 = time.perf_counter()
        x = preprocess(load_image(p), c.encoder.spec)[None]
        t1 = time.perf_counter()
        feats = c.encoder.encode(x)
        t2 = time.perf_counter()
        c.runtime.decode(feats, None, beam_size=beam, max_len=c.max_len, n_best=1)  # plain: no heads, no bias
        t3 = time.perf_counter()
        read.append(t1 - t0), enc.append(t2 - t1), dec.append(t3 - t2)
    return {"images": len(photos), "beam": beam, "caption_words_mean": round(float(np.mean(words)), 2),
            **ms_stats(total), "stages_median_ms": {k: ms_stats(v)["median_ms"] for k, v in
                                                      [("read_resize", read), ("encoder", enc), ("decoder", dec)]}}


def throughput(c: Captioner, photos: list[Path], beam: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        for p in photos:  # a folder of links: the CLI reads the real files through them
            os.symlink(p, Path(folder) / p.name)
        args = cli.build_parser().parse_args(["caption", folder, "--beam", str(beam), "--batch-size",
                                              str(batch_size), "--no-progress"])
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            rc = args.run(args, captioner=c)
        seconds = time.perf_counter() - t0
    lines = out.getvalue().splitlines()
    if rc != 0 or len(lines) != len(photos):
        sys.exit(f"captioning the folder failed: exit status {rc}, {len(lines)} of {len(photos)} captions")
    return {"images": len(photos), "beam": beam, "batch_size": batch_size, "seconds": round(seconds, 2),
            "images_per_s": round(len(photos) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint or model folder (default: the shipped model)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"], help="decoder runtime")
    ap.add_argument("--data", type=Path, default=FLICKR8K, help="Flickr8k root (../shared/flickr8k)")
    ap.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--folder-images", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16, help="the CLI's --batch-size for the folder run (16)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-int8", dest="int8", action="store_false", help="decode with the float weights")
    ap.add_argument("--plain", dest="grounded", action="store_false", help="without the grounding heads")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"), help="JSON results")
    args = ap.parse_args()

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    c = Captioner.load(args.model, runtime=args.runtime, backend=args.backend, beam_size=args.beam, int8=args.int8,
                       grounded=args.grounded)
    load_s = time.perf_counter() - t0
    lat = latency(c, dev_photos(args.data, args.latency_images), args.beam, args.warmup)
    thr = throughput(c, dev_photos(args.data, args.folder_images, skip=args.latency_images), args.beam,
                     args.batch_size)
    result = {
        "model": c.info["name"], "encoder": c.info["encoder"], "backend": c.info["backend"], "runtime": c.info["runtime"],
        "decoder_weights": c.info["decoder_weights"], "grounded": c.info["grounded"],
        "load_s": round(load_s, 2), "latency": lat, "throughput": thr,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "onnxruntime": metadata.version("onnxruntime"),
                    "python": sys.version.split()[0]},
        "goals": {"median_ms": 20, "folder_images_per_s": 75},
    }
    atomic_write_json(args.out, result)

    s = lat["stages_median_ms"]
    print(f"model {result['model']} ({result['encoder']}, {result['backend']}, {result['runtime']} {result['decoder_weights']} decoder), "
          f"{os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f} -> {result['machine']['loadavg_after'][0]:.1f}")
    print(f"{'measure':<44} {'value':>10}  goal")
    print(f"{'model load (s)':<44} {load_s:>10.2f}")
    print(f"{'batch 1, beam %d: median ms' % args.beam:<44} {lat['median_ms']:>10.1f}  20")
    print(f"{'batch 1, beam %d: p95 ms' % args.beam:<44} {lat['p95_ms']:>10.1f}")
    print(f"{'  of which read+resize / encoder / decoder ms':<44} "
          f"{s['read_resize']:.1f} / {s['encoder']:.1f} / {s['decoder']:.1f}")
    print(f"{'folder of %d, batch %d: images/s' % (thr['images'], thr['batch_size']):<44} "
          f"{thr['images_per_s']:>10.1f}  75")
    print(f"{'peak RSS (MB)':<44} {result['peak_rss_mb']:>10.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
