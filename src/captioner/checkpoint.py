"""Checkpoints: one safetensors file holding the weights, with config, vocabulary and metadata as JSON
in its header. safetensors never runs code on load, unlike pickle-based .pt files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from captioner.config import Config
from captioner.data.vocab import Vocabulary
from captioner.io import atomic_write_bytes
from captioner.model import ShowAttendTell

FORMAT = "captioner-sat/1"


def default_model_path() -> Path:
    """The Flickr8k model shipped inside the package."""
    return Path(__file__).resolve().parent / "assets" / "flickr8k-sat.safetensors"


@dataclass
class Checkpoint:
    model: ShowAttendTell
    vocab: Vocabulary
    config: Config
    meta: dict
    path: Path


def save_checkpoint(path, model: ShowAttendTell, vocab: Vocabulary, config: Config, meta: dict,
                    dtype: torch.dtype | None = None) -> None:
    """Write atomically; `dtype=torch.float16` halves the size of a shipped model."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()  # clone: tied weights must not share storage in safetensors
    header = {"format": FORMAT, "config": config.to_json(), "vocab": json.dumps(vocab.to_dict()),
              "meta": json.dumps(meta)}
    atomic_write_bytes(path, st_save(tensors, metadata=header))


def read_header(path) -> dict:
    """Config, vocabulary and metadata without loading the weights."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a safetensors checkpoint ({e}); pickle checkpoints are refused "
                         "because loading them can run arbitrary code") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a captioner checkpoint (format {header.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return header


def load_checkpoint(path=None, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path) if path is not None else default_model_path()
    header = read_header(path)
    try:
        config = Config.from_json(header["config"])
        vocab = Vocabulary.from_dict(json.loads(header["vocab"]))
        meta = json.loads(header["meta"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: damaged checkpoint header ({e})") from None
    model = ShowAttendTell(config, len(vocab))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not fit the model its header describes ({e})") from None
    model.to(device).eval()
    return Checkpoint(model, vocab, config, meta, path)
