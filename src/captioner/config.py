"""The one configuration dataclass: model sizes, training and data settings.

The defaults are the 2-core CPU recipe (configs/flickr8k.toml); a TOML file holds only what it changes, and
a key the dataclass does not have is an error. Every checkpoint stores the whole config as JSON, so a model
can always be rebuilt exactly as trained.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Config:
    # data
    min_count: int = 5          # words rarer than this in train become <unk>
    max_len: int = 30           # caption tokens kept for training (without <start>/<end>)
    # encoder (see features/encoder.py get_spec: "lite2", "lite0+lite2", "lite2-cut2" = fine-tune its top 2
    # blocks and head; sizes travel so mismatches are caught)
    encoder: str = "lite2"
    feature_dim: int = 1280
    num_regions: int = 81
    # model
    embed_dim: int = 512
    project_dim: int = 512      # image features are projected to this width once per image
    attention_dim: int = 256
    decoder_dim: int = 512
    dropout: float = 0.5
    tie_weights: bool = False
    alpha_c: float = 1.0        # doubly stochastic attention regulariser
    aoa: bool = False           # attention on attention: the attended context gated by the decoder state (model.py)
    pyramid: int = 0            # also attend to the grid average-pooled to k x k regions, a coarser scale (model.py)
    concept_input: bool = False  # the decoder also reads the encoder's ImageNet class probabilities (model.py)
    # training
    epochs: int = 8
    batch_size: int = 32        # images per batch; each brings all its captions
    lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float = 5.0
    warmup_steps: int = 100
    label_smoothing: float = 0.0
    flip_prob: float = 0.0      # train on the mirror image (left/right swapped) this often; needs `features --flip`
    crop_views: int = 0         # train on one of this many cropped, colour-jittered copies or the photo, drawn per
                                # epoch; needs `features --crops N` (N >= crop_views)
    finetune_lr_scale: float = 0.1  # learning rate of the CNN top of a "-cutK" encoder, relative to lr
    patience: int = 2           # epochs without dev improvement before stopping
    select_metric: str = "cider"  # "cider" or "bleu4", from real greedy decoding on dev
    # "xent": teacher forcing with cross-entropy; "scst": self-critical REINFORCE on CIDEr-D (start from --init)
    objective: str = "xent"
    scst_samples: int = 5       # captions sampled per image
    scst_baseline: str = "mean"  # "mean" of the image's other samples, or its "greedy" caption
    scst_bleu_weight: float = 0.0  # reward = CIDEr-D + this x sentence BLEU-4 (issue 21, lever 5b)
    seed: int = 0
    num_workers: int = 0
    # "bf16": matrix products in bfloat16 (autocast; the loss and the weights stay float32); "fp32"; "auto": bf16
    # on a GPU and on a CPU with native bf16 (2.2x faster per cross-entropy epoch on 2 cores, same dev scores:
    # benchmarks/train_speed.py), else fp32
    precision: str = "auto"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, names, 1)) else k
                     for k in unknown]
            raise ValueError(f"unknown config keys: {', '.join(hints)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_toml(cls, path: str | Path, base: "Config | None" = None) -> "Config":
        """The file's fields; those it leaves out come from `base` (e.g. the config of an --init checkpoint)."""
        with open(path, "rb") as f:
            d = tomllib.load(f)
        return cls.from_dict({**(dataclasses.asdict(base) if base else {}), **d})

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
