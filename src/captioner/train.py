"""The whole training loop: teacher forcing with cross-entropy, or self-critical sequence training
(REINFORCE on the CIDEr-D of sampled captions, Rennie et al. 2017) from a trained checkpoint;
dev selection by real decoding either way.

Runs as it is on one CPU or GPU, and under `torchrun --nproc_per_node=N` with DistributedDataParallel
(gloo on CPU, nccl on GPU): each rank takes its share of the batches, rank 0 alone scores dev and
writes files.

RUNDIR gets: config.json, last.safetensors and best.safetensors (weights + config + vocabulary +
metadata), state.safetensors (optimiser and RNG state, for --resume), log.csv and curves.png.

Read `train` first: `_setup` builds the run, then every epoch is `train_epoch` (batches, `train_step`) and
`evaluate_and_checkpoint` (dev scores, checkpoints, early stopping). The helpers above it are the pieces.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from tqdm import tqdm

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.config import Config
from captioner.data.datasets import PreparedData, load_prepared
from captioner.decode import greedy, sample
from captioner.evaluation.cider import CiderD
from captioner.evaluation.metrics import ptb_tokenize
from captioner.features.store import FLIP, FeatureStore, crop_views
from captioner.io import atomic_write_bytes, atomic_write_text
from captioner.model import ShowAttendTell, caption_loss
from captioner.train_data import CaptionDataset, collate_images, epoch_batches


# --- learning rate -------------------------------------------------------------------------------

def lr_at(step: int, total: int, config: Config) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- dev scoring -----------------------------------------------------------------------------------

@torch.no_grad()
def dev_scores(model, data: PreparedData, store: FeatureStore, split: str = "dev", batch_size: int = 250,
               device="cpu", max_len: int = 30) -> tuple[dict, dict]:
    """Greedy-decode the split and score it with the COCO toolkit (real decoding, never teacher forcing)."""
    from captioner.evaluation.metrics import score_captions
    model = getattr(model, "module", model)
    records = [r for r in data.split(split) if r.image_id in store]
    candidates = {}
    for i in range(0, len(records), batch_size):
        ids = [r.image_id for r in records[i:i + batch_size]]
        feats = torch.from_numpy(store.get(ids)).to(device)
        for image_id, cap in zip(ids, greedy(model, data.vocab, feats, max_len=max_len)):
            candidates[image_id] = cap.text
    references = {r.image_id: r.captions for r in records}
    # the pure-Python PTB tokenizer gives the same tokens as the Java one on Flickr8k, without a JVM start
    scores = score_captions(candidates, references, meteor=False, tokenizer="python")
    model.train()
    return scores.corpus, candidates


# --- self-critical sequence training -----------------------------------------------------------

class Reward:
    """The self-critical reward of a caption: CIDEr-D, plus `bleu_weight` x its sentence BLEU-4 (pycocoevalcap's
    scorer) when the config mixes them in. References are PTB-tokenised; document frequencies come from them."""

    def __init__(self, references: dict[str, list[str]], bleu_weight: float = 0.0):
        self.cider, self.references, self.bleu_weight = CiderD(references), references, bleu_weight

    def scores(self, texts: list[str], image_ids: list[str]) -> np.ndarray:
        reward = self.cider.scores(texts, image_ids)
        if self.bleu_weight:
            bleu = BleuScorer(n=4)
            for text, image_id in zip(texts, image_ids):
                bleu += (text, self.references[image_id])
            reward = reward + self.bleu_weight * np.asarray(bleu.compute_score(option="closest", verbose=0)[1][3])
        return reward


def scst_loss(model, vocab, feats, image_ids: list[str], reward_of: Reward, config: Config):
    """REINFORCE with a baseline: sampled captions that beat the baseline's reward become more likely.
    Returns (loss, mean reward, mean baseline)."""
    n = config.scst_samples
    words, logp, mask = sample(model, vocab, feats, n, max_len=config.max_len)
    texts = [ptb_tokenize(" ".join(vocab.decode(row))) for row in words.tolist()]
    reward = reward_of.scores(texts, [i for i in image_ids for _ in range(n)]).reshape(-1, n)
    if config.scst_baseline == "greedy":  # Rennie et al.: the test-time caption is the bar to beat
        caps = greedy(model, vocab, feats, max_len=config.max_len)
        model.train()
        baseline = reward_of.scores([ptb_tokenize(c.text) for c in caps], image_ids)[:, None].repeat(n, 1)
    else:  # the mean of the image's other samples (Luo 2020): no extra decoding, lower variance
        baseline = (reward.sum(1, keepdims=True) - reward) / (n - 1)
    advantage = torch.as_tensor((reward - baseline).reshape(-1, 1), dtype=logp.dtype, device=logp.device)
    loss = -(advantage * logp * mask).sum() / mask.sum()
    return loss, float(reward.mean()), float(baseline.mean())


# --- state that lets an interrupted run continue bit for bit ----------------------------------------

def save_state(path: Path, model, optimizer, epoch: int, step: int, best: float, bad_epochs: int,
               history: list):
    """Weights, optimiser and RNG in one atomic file, so they can never disagree after a crash."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    groups = []
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    for g in optimizer.state_dict()["param_groups"]:
        groups.append({k: v for k, v in g.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": epoch, "step": step, "best": best, "bad_epochs": bad_epochs, "history": history,
            "param_groups": groups, "rng.python": repr(random.getstate()),
            "rng.numpy": json.dumps(np.random.get_state()[1].tolist())}
    atomic_write_bytes(path, st_save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()}))


def load_state(path: Path, model, optimizer) -> dict:
    """Restore what save_state wrote; a damaged or truncated file is one ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        missing = [k for k in ("epoch", "step", "best", "bad_epochs", "history") if k not in meta]
        if missing:
            raise KeyError(f"no {missing[0]!r} in its header")
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"{path}: damaged training state, cannot resume ({type(e).__name__}: {reason}); "
                         "pass --force to start afresh") from None
    return meta


# --- logs and plots ------------------------------------------------------------------------------

def write_logs(rundir: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(rundir / "log.csv", buf.getvalue())

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train cross-entropy"), ("train_reward", "train reward of samples"),
                       ("train_baseline", "baseline")):
        if key in history[-1]:
            ax1.plot([h["epoch"] for h in history if key in h], [h[key] for h in history if key in h], "o-",
                     label=label)
    ax1.set_xlabel("epoch"), ax1.legend(), ax1.grid(alpha=0.3)
    for key in ("bleu4", "cider"):
        if key in history[0]:
            ax2.plot(epochs, [h[key] for h in history], "o-", label=f"dev {key} (greedy)")
    ax2.set_xlabel("epoch"), ax2.set_ylabel("score"), ax2.legend(), ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(rundir / "curves.png", buf.getvalue())


# --- the loop --------------------------------------------------------------------------------------

RUN_OUTPUTS = ("state.safetensors", "last.safetensors", "best.safetensors", "log.csv")


def _check_run_folder(rundir: Path, resume: bool, force: bool) -> bool:
    """Whether to resume. A run's outputs are never overwritten by mistake: --resume needs a resumable
    state, and a fresh start in a folder that holds a run needs --force."""
    state = rundir / "state.safetensors"
    outputs = [n for n in RUN_OUTPUTS if (rundir / n).exists()]
    if resume and state.exists():
        if not (rundir / "config.json").is_file():
            raise ValueError(f"{rundir / 'config.json'}: missing, so the run cannot be resumed")
        return True
    if force:
        return False
    if resume and not rundir.exists():
        raise ValueError(f"{rundir}: no such run folder to resume (leave out --resume to start a new run)")
    if resume:
        raise ValueError(f"{state}: missing, nothing to resume"
                         + (f" ({', '.join(outputs)} would be overwritten)" if outputs else "")
                         + "; pass --force to start afresh in this folder")
    if outputs:
        raise ValueError(f"{rundir}: already holds a training run ({', '.join(outputs)}); pass --resume to "
                         "continue it, --force to start afresh over it, or choose another --out")
    return False


@dataclass
class Progress:
    """Where a run stands; state.safetensors keeps it, so a resumed run carries on from here."""
    epoch: int = 0        # the next epoch to train
    step: int = 0         # optimiser steps so far
    best: float = -1.0    # the best dev score (config.select_metric) so far
    bad_epochs: int = 0   # epochs since it improved
    history: list = field(default_factory=list)  # one log row per epoch


@dataclass
class Run:
    """What one training run works with, built once by `_setup`."""
    config: Config
    rundir: Path
    device: torch.device
    rank: int
    world: int
    data: PreparedData
    store: FeatureStore
    train_set: CaptionDataset
    model: ShowAttendTell
    net: torch.nn.Module            # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    lengths: list[int]              # caption length of each training image, for batching
    steps_per_epoch: int
    meta: dict                      # what every checkpoint's metadata says about the run
    reward: Reward | None           # the reward of self-critical training (None: cross-entropy)
    progress: Progress

    @property
    def main(self) -> bool:  # rank 0 alone scores dev and writes files
        return self.rank == 0

    @property
    def scst(self) -> bool:
        return self.reward is not None

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def bf16(self) -> bool:
        return use_bf16(self.config, self.device)


def use_bf16(config: Config, device: torch.device) -> bool:
    """Whether training runs its matrix products in bfloat16 (config.precision)."""
    if config.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision {config.precision!r}: expected auto, bf16 or fp32")
    if config.precision != "auto":
        return config.precision == "bf16"
    if device.type == "cuda":
        return True
    # on a CPU only where it has native bf16 (emulated bf16 is slower than float32); the shipped model was trained
    # so, cross-entropy and self-critical (docs/training.md)
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


@dataclass
class EpochStats:
    """What one epoch of training measured, for the log."""
    fit: dict        # {"train_loss"} or {"train_reward", "train_baseline"}: means over the epoch
    seconds: float
    captions: int    # captions this rank trained on (sampled ones in self-critical training)


def train(workdir, out, config: Config | None = None, *, init=None, resume: bool = False,
          device: str | None = None, progress: bool = True, stop_after_steps: int | None = None,
          force: bool = False) -> dict:
    """Train on WORKDIR's train split; select on dev. Returns the best dev scores.
    `init` is a checkpoint to start from (required for config.objective == "scst").
    `resume` continues the run in `out` (refused when it has no state.safetensors); `force` starts afresh
    in a folder that holds a run, overwriting it.
    `stop_after_steps` ends the run abruptly after that many optimiser steps (for tests of resume)."""
    rank, world = _start_processes()
    rundir = Path(out)
    resuming = _check_run_folder(rundir, resume, force)
    config = _run_config(rundir, config, resuming=resuming, init=init, distributed=world > 1)
    random.seed(config.seed), np.random.seed(config.seed), torch.manual_seed(config.seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = _setup(workdir, rundir, config, init=init, resuming=resuming, device=device, rank=rank, world=world)

    for epoch in range(run.progress.epoch, run.config.epochs):
        stats = train_epoch(run, epoch, show_progress=progress, stop_after_steps=stop_after_steps)
        stop = run.main and evaluate_and_checkpoint(run, epoch, stats)
        if world > 1:  # every rank stops together
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        if stop:
            if run.main:
                print(f"early stop: no dev {run.config.select_metric} improvement for {run.config.patience} epochs")
            break

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"best": run.progress.best, "history": run.progress.history, "rundir": str(rundir)}


# --- setup ---------------------------------------------------------------------------------------

def _start_processes() -> tuple[int, int]:
    """(rank, world size): 0, 1 alone; under torchrun, joins the process group (nccl on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _run_config(rundir: Path, config: Config | None, *, resuming: bool, init, distributed: bool) -> Config:
    """The config the run trains with, checked: a resumed run's own config wins (only the number of epochs
    may be extended); otherwise `config`, or the defaults."""
    if resuming:
        try:
            saved = Config.from_json((rundir / "config.json").read_text())
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{rundir / 'config.json'}: unreadable, so the run cannot be resumed ({e})") from None
        config = saved.replace(epochs=config.epochs if config else None)
    config = config or Config()
    if config.objective not in ("xent", "scst") or config.scst_baseline not in ("mean", "greedy"):
        raise ValueError(f"objective must be 'xent' or 'scst' and scst_baseline 'mean' or 'greedy', not "
                         f"{config.objective!r} / {config.scst_baseline!r}")
    if config.objective == "scst":
        if distributed:
            raise ValueError("self-critical training runs in one process; start it without torchrun")
        if config.scst_baseline == "mean" and config.scst_samples < 2:
            raise ValueError("scst_baseline 'mean' needs scst_samples >= 2")
        if not (init or resuming):
            raise ValueError("self-critical training starts from a trained model: pass --init CHECKPOINT")
    return config


def _setup(workdir, rundir: Path, config: Config, *, init, resuming: bool, device: torch.device, rank: int,
           world: int) -> Run:
    """Data, model, optimiser and, when resuming, the saved progress (weights, optimiser and RNG state)."""
    data = load_prepared(workdir)
    store = FeatureStore.open(workdir, config.encoder)
    spec = store.spec
    if (spec.channels, spec.num_regions) != (config.feature_dim, config.num_regions):
        config = config.replace(feature_dim=spec.channels, num_regions=spec.num_regions)
    mirrored = FeatureStore.open(workdir, config.encoder, FLIP) if config.flip_prob > 0 else None
    crops = [FeatureStore.open(workdir, config.encoder, view) for view in crop_views(config.crop_views)]
    train_set = CaptionDataset(store, data, "train", config.max_len, mirrored, config.flip_prob, config.seed, crops)
    model = ShowAttendTell(config, len(data.vocab))
    if init and not resuming:
        start = load_checkpoint(init)
        if start.vocab != data.vocab:
            raise ValueError(f"{init}: its vocabulary differs from {workdir}'s; prepare the data the same way")
        model.load_state_dict(start.model.state_dict())
    elif config.concept_input and not resuming:
        model.load_imagenet()
    model = model.to(device)
    if rank == 0:
        rundir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rundir / "config.json", json.dumps(json.loads(config.to_json()), indent=2) + "\n")

    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = _optimizer(model, config)
    progress = Progress()
    if resuming:
        meta = load_state(rundir / "state.safetensors", model, optimizer)
        progress = Progress(meta["epoch"] + 1, meta["step"], meta["best"], meta["bad_epochs"], meta["history"])
        if rank == 0:
            print(f"resuming {rundir} after epoch {meta['epoch'] + 1} (step {progress.step})")

    lengths = [min(config.max_len, max(len(t) for t in data.tokens[i])) for i in train_set.image_ids]
    steps_per_epoch = len(epoch_batches(lengths, config.batch_size, config.seed, 0)) // world
    meta = {"name": rundir.name, "encoder": config.encoder, "input_size": spec.input_size,
            "grid": list(spec.grid), "workdir": str(workdir), "init": str(init) if init else None}
    reward = None
    if config.objective == "scst":  # document frequencies from the training references, once (as in the SCST papers)
        train_ids = set(train_set.image_ids)
        reward = Reward({r.image_id: [ptb_tokenize(c) for c in r.captions]
                         for r in data.records if r.image_id in train_ids}, config.scst_bleu_weight)
    return Run(config, rundir, device, rank, world, data, store, train_set, model, net, optimizer, lengths,
               steps_per_epoch, meta, reward, progress)


def _optimizer(model: ShowAttendTell, config: Config) -> torch.optim.Optimizer:
    """AdamW; a "-cutK" encoder's top (the fine-tuned CNN blocks) learns at finetune_lr_scale of the rate."""
    cnn = [p for name, p in model.named_parameters() if name.startswith("top.")]
    rest = [p for name, p in model.named_parameters() if not name.startswith("top.")]
    groups = [{"params": rest, "lr_scale": 1.0}] + ([{"params": cnn, "lr_scale": config.finetune_lr_scale}] * bool(cnn))
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


# --- one epoch -------------------------------------------------------------------------------------

def train_epoch(run: Run, epoch: int, *, show_progress: bool = True, stop_after_steps: int | None = None) -> EpochStats:
    """One pass over this rank's share of the epoch's batches."""
    config, progress = run.config, run.progress
    batches = epoch_batches(run.lengths, config.batch_size, config.seed, epoch)
    batches = batches[run.rank::run.world][:run.steps_per_epoch]
    run.train_set.epoch = epoch
    loader = torch.utils.data.DataLoader(run.train_set, batch_sampler=batches, collate_fn=collate_images,
                                         num_workers=config.num_workers)
    run.net.train()
    sums = dict.fromkeys(("reward", "baseline") if run.scst else ("loss",), 0.0)
    t0, seen, n = time.time(), 0, 0
    bar = tqdm(zip(batches, loader), total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}",
               disable=not (show_progress and run.main), unit="batch", dynamic_ncols=True)
    for batch, (feats, caps, index) in bar:
        for g in run.optimizer.param_groups:
            g["lr"] = lr_at(progress.step, run.total_steps, config) * g.get("lr_scale", 1.0)
        measured = train_step(run, batch, feats.to(run.device), caps.to(run.device), index.to(run.device))
        progress.step += 1
        n += 1
        seen += feats.size(0) * config.scst_samples if run.scst else caps.size(0)
        for key, value in measured.items():
            sums[key] += value
        bar.set_postfix(**{key: f"{total / n:.3f}" for key, total in sums.items()},
                        caps_s=f"{seen * run.world / (time.time() - t0):.0f}")
        if stop_after_steps is not None and progress.step >= stop_after_steps:
            os._exit(3)  # simulate kill -9: no cleanup, nothing flushed
    fit = {f"train_{key}": round(total / max(n, 1), 4) for key, total in sums.items()}
    return EpochStats(fit, time.time() - t0, seen)


def train_step(run: Run, batch: list[int], feats, caps, index) -> dict[str, float]:
    """One optimiser step on one batch. Returns what it measured: the cross-entropy, or the mean reward of
    the sampled captions and of their baseline."""
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16):
        if run.scst:
            ids = [run.train_set.image_ids[i] for i in batch]
            loss, reward, baseline = scst_loss(run.model, run.data.vocab, feats, ids, run.reward, run.config)
            measured = {"reward": reward, "baseline": baseline}
        else:
            logits, alphas = run.net(feats, caps, index)
    if not run.scst:
        loss, xent = caption_loss(logits.float(), alphas.float(), caps, run.config, run.data.vocab.pad_id)
        measured = {"loss": xent.item()}
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    return measured


# --- after each epoch: dev selection and checkpoints -------------------------------------------------

def evaluate_and_checkpoint(run: Run, epoch: int, stats: EpochStats) -> bool:
    """Rank 0 after each epoch: greedy dev scores, last.safetensors, best.safetensors when dev improved, the
    resumable state and the logs. Returns whether to stop early (no improvement for `patience` epochs)."""
    config, progress = run.config, run.progress
    scores, _ = dev_scores(run.model, run.data, run.store, device=run.device, max_len=config.max_len)
    row = {"epoch": epoch + 1, "step": progress.step, **stats.fit,
           "lr": run.optimizer.param_groups[0]["lr"], "train_secs": round(stats.seconds, 1),
           "captions_per_sec": round(stats.captions * run.world / stats.seconds, 1),
           **{k: round(v, 4) for k, v in scores.items() if v is not None}}
    progress.history.append(row)
    meta = {**run.meta, "epoch": epoch + 1, "dev_scores_greedy": scores}
    save_checkpoint(run.rundir / "last.safetensors", run.model, run.data.vocab, config, meta)
    if scores[config.select_metric] > progress.best:
        progress.best, progress.bad_epochs = scores[config.select_metric], 0
        save_checkpoint(run.rundir / "best.safetensors", run.model, run.data.vocab, config, meta)
    else:
        progress.bad_epochs += 1
    save_state(run.rundir / "state.safetensors", run.model, run.optimizer, epoch, progress.step, progress.best,
               progress.bad_epochs, progress.history)
    write_logs(run.rundir, progress.history)
    fit_text = (f"reward {row['train_reward']:.3f} (baseline {row['train_baseline']:.3f})" if run.scst
                else f"loss {row['train_loss']:.3f}")
    print(f"epoch {epoch + 1}: {fit_text}, {row['captions_per_sec']:.0f} captions/s, "
          f"{stats.seconds:.0f} s; dev greedy BLEU-4 {scores['bleu4']:.4f} CIDEr-D {scores['cider']:.4f}"
          f"{'  (best)' if progress.bad_epochs == 0 else ''}", flush=True)
    return progress.bad_epochs >= config.patience
