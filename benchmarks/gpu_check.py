"""GPU check: the CUDA path of training (bf16 autocast), decoding on the GPU, and GPU throughput.

    python benchmarks/gpu_check.py WORKDIR [--out DIR]

WORKDIR is a prepared dataset with a lite2 feature store (a small one is enough). Trains 3 epochs on
CUDA through `captioner.train.train`, checks that the checkpoint loads on the CPU and captions the
same way on both devices, times a Flickr8k-sized training step and batched decoding, and prints JSON.
"""
import argparse
import json
import sys
import time

import torch

from captioner.checkpoint import load_checkpoint
from captioner.config import Config
from captioner.data.datasets import load_prepared
from captioner.decode import decode, greedy
from captioner.features.store import FeatureStore
from captioner.model import ShowAttendTell, caption_loss
from captioner.train import train


def cuda_time(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--out", default="runs/gpu-check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    # 1. the real training entry point on CUDA (bf16 autocast inside)
    config = Config(epochs=3, batch_size=8, warmup_steps=5, patience=10)
    result = train(args.workdir, args.out, config, device="cuda", progress=False)
    report["train_losses"] = [h["train_loss"] for h in result["history"]]
    assert all(map(lambda x: x == x and x < 10, report["train_losses"])), "non-finite or exploding loss"

    # 2. the checkpoint written on the GPU loads and decodes on the CPU like on the GPU
    ckpt = load_checkpoint(f"{args.out}/last.safetensors")
    data = load_prepared(args.workdir)
    store = FeatureStore.open(args.workdir, ckpt.config.encoder)
    ids = [r.image_id for r in data.split("dev") if r.image_id in store]
    feats = torch.from_numpy(store.get(ids))
    cpu = [c.text for c in greedy(ckpt.model, ckpt.vocab, feats)]
    gpu_model = load_checkpoint(f"{args.out}/last.safetensors", device="cuda").model
    gpu = [c.text for c in greedy(gpu_model, ckpt.vocab, feats.cuda())]
    report["cpu_gpu_same_captions"] = sum(a == b for a, b in zip(cpu, gpu)) / len(cpu)

    # 3. throughput of a Flickr8k-sized step: 32 images x 5 captions, 16 steps, vocabulary 2,537
    torch.manual_seed(0)
    cfg = Config()
    model = ShowAttendTell(cfg, 2537).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    f = torch.randn(32, 81, 1280, device="cuda")
    caps = torch.randint(4, 2537, (160, 17), device="cuda")
    idx = torch.arange(32, device="cuda").repeat_interleave(5)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, alphas = model(f, caps, idx)
        loss, _ = caption_loss(logits.float(), alphas.float(), caps, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()

    secs = cuda_time(step)
    report["train_captions_per_sec"] = round(160 / secs)
    report["flickr8k_epoch_seconds"] = round(29983 / (160 / secs), 1)

    # 4. batched decoding on the GPU
    model.eval()
    vocab = ckpt.vocab.__class__(list(ckpt.vocab.SPECIALS) + [f"w{i}" for i in range(2533)])
    x = torch.randn(500, 81, 1280, device="cuda")
    with torch.inference_mode():
        report["greedy_ms_per_image"] = round(cuda_time(lambda: greedy(model, vocab, x), 2) / 500 * 1000, 3)
        report["beam3_ms_per_image"] = round(cuda_time(lambda: decode(model, vocab, x, beam_size=3), 2) / 500 * 1000, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
