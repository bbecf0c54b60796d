"""Training throughput on this machine: captions/s and projected seconds per Flickr8k epoch, peak RSS.

    python benchmarks/train_speed.py [--work work/flickr8k] [--config configs/flickr8k.toml] [--batches 30] [--precision fp32]
    python benchmarks/train_speed.py --run runs/flickr8k     # per-epoch figures of a finished run

Times the real training step (the same DataLoader, model, loss and optimiser as `captioner train`)
on length-grouped Flickr8k batches; writes benchmarks/results/train_speed.json.
"""
import argparse
import csv
import os
import resource
import time

import torch

from captioner.config import Config
from captioner.data.datasets import load_prepared
from captioner.features.store import FeatureStore
from captioner.io import atomic_write_json
from captioner.model import ShowAttendTell, caption_loss
from captioner.train import use_bf16
from captioner.train_data import CaptionDataset, collate_images, epoch_batches


def report_run(rundir):
    with open(os.path.join(rundir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    print(f"{'epoch':>5} {'train s':>8} {'caps/s':>7} {'loss':>6} {'BLEU-4':>7} {'CIDEr-D':>8}")
    for r in rows:
        print(f"{r['epoch']:>5} {float(r['train_secs']):8.0f} {float(r['captions_per_sec']):7.0f} "
              f"{float(r['train_loss']):6.3f} {float(r['bleu4']):7.4f} {float(r['cider']):8.4f}")
    best = max(rows, key=lambda r: float(r["cider"]))
    upto = sum(float(r["train_secs"]) for r in rows[:int(best["epoch"])])
    print(f"best dev CIDEr-D {float(best['cider']):.4f} at epoch {best['epoch']}; "
          f"training seconds up to it: {upto:.0f} (dev scoring excluded)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="work/flickr8k")
    ap.add_argument("--config", default="configs/flickr8k.toml")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--run", help="print the per-epoch log of a finished run instead")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="override the config's precision")
    ap.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = ap.parse_args()
    if args.run:
        return report_run(args.run)

    config = Config.from_toml(args.config)
    if args.precision:
        config = config.replace(precision=args.precision)
    bf16 = use_bf16(config, torch.device("cpu"))
    data = load_prepared(args.work)
    store = FeatureStore.open(args.work, config.encoder)
    ds = CaptionDataset(store, data, "train", config.max_len)
    lengths = [min(config.max_len, max(len(t) for t in data.tokens[i])) for i in ds.image_ids]
    batches = epoch_batches(lengths, config.batch_size, config.seed, 0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches[:args.batches + 3], collate_fn=collate_images)
    torch.manual_seed(0)
    model = ShowAttendTell(config, len(data.vocab)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    captions, seconds = 0, 0.0
    for i, (feats, caps, index) in enumerate(loader):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, alphas = model(feats, caps, index)
        loss, _ = caption_loss(logits.float(), alphas.float(), caps, config)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        if i >= 3:  # the first batches warm up allocators and threads
            seconds += time.perf_counter() - t
            captions += caps.size(0)
    total = sum(len(data.tokens[i]) for i in ds.image_ids)
    rate = captions / seconds
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{captions} captions in {seconds:.1f} s: {rate:.0f} captions/s -> {total / rate:.0f} s per epoch "
          f"({total} captions); {'bf16' if bf16 else 'fp32'}; peak RSS {rss:.0f} MiB; {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    atomic_write_json(args.out, {"captions_per_sec": round(rate, 1), "epoch_seconds": round(total / rate, 1),
                                 "peak_rss_mib": round(rss), "threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32",
                                 "loadavg": os.getloadavg()[0], "config": args.config})


if __name__ == "__main__":
    main()
