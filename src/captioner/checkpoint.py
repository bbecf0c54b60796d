"""Checkpoints: one safetensors file holding the weights, with config, vocabulary and metadata as JSON
in its header. safetensors never runs code on load, unlike pickle-based .pt files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from captioner.config import Config
from captioner.data.vocab import Vocabulary
from captioner.io import atomic_write_bytes
from captioner.model import ShowAttendTell
from captioner.pretrained import FILES, default_model_path

if TYPE_CHECKING:
    from captioner.grounding import Grounding

FORMAT = "captioner-sat/1"


GROUNDING_PREFIX = "grounding."  # tensors of the concept and evidence heads (grounding.py), when the model has them


@dataclass
class Checkpoint:
    model: ShowAttendTell
    vocab: Vocabulary
    config: Config
    meta: dict
    path: Path
    grounding: "Grounding | None" = None  # None in checkpoints from before grounding: plain captions


def save_checkpoint(path, model: ShowAttendTell, vocab: Vocabulary, config: Config, meta: dict,
                    dtype: torch.dtype | None = None, grounding=None) -> None:
    """Write atomically; `dtype=torch.float16` halves the size of a shipped model. `grounding` (a
    grounding.Grounding) travels in the same file, its settings in the header."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = dict(model.state_dict())
    if grounding is not None:
        state.update({GROUNDING_PREFIX + k: v for k, v in grounding.state_dict().items()})
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()  # clone: tied weights must not share storage in safetensors
    header = {"format": FORMAT, "config": config.to_json(), "vocab": json.dumps(vocab.to_dict()),
              "meta": json.dumps(meta)}
    if grounding is not None:
        header["grounding"] = json.dumps(grounding.settings_dict())
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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_weights(path, state: dict, expected: dict) -> None:
    """Refuse, in one line naming the file and the tensor, weights that would load but caption garbage:
    a missing, extra or misshapen tensor, an integer dtype where the model has floats (int8 weights cast
    to float are nonsense), or a NaN/inf value (every request would fail)."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]} is not part of the model ({len(extra)} unexpected in all)")
    for key, want in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{path}: tensor {key} has shape {list(t.shape)}, the model needs {list(want.shape)}")
        if want.is_floating_point():
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{path}: tensor {key} is {str(t.dtype).removeprefix('torch.')}; "
                                 "expected float16, bfloat16 or float32")
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {key} holds NaN or infinite values")
        elif t.dtype != want.dtype:
            raise ValueError(f"{path}: tensor {key} is {str(t.dtype).removeprefix('torch.')}; "
                             f"expected {str(want.dtype).removeprefix('torch.')}")


def load_checkpoint(path=None, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():  # a model folder (pretrained.py): its checkpoint
        path = path / FILES["weights"]
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
            state = {k: f.get_tensor(k) for k in f.keys()}
        heads = {k.removeprefix(GROUNDING_PREFIX): state.pop(k) for k in list(state) if k.startswith(GROUNDING_PREFIX)}
        check_weights(path, state, model.state_dict())
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not fit the model its header describes "
                         f"({' '.join(str(e).split())[:300]})") from None
    model.to(device).eval()
    return Checkpoint(model, vocab, config, meta, path, _load_grounding(path, header, heads))


def _load_grounding(path, header: dict, heads: dict):
    if not heads:
        return None
    from captioner.grounding import Grounding, GroundingSettings
    try:
        settings = GroundingSettings.from_dict(json.loads(header.get("grounding", "{}")))
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: damaged grounding settings in the header ({e})") from None
    centroids = heads.get("domain_centroids")  # absent in checkpoints of earlier versions
    g = Grounding(settings=settings, centroids=0 if centroids is None else len(centroids))
    expected = g.state_dict()
    if centroids is None:
        heads = {**heads, **{k: expected[k] for k in ("domain_mean", "domain_centroids")}}
    check_weights(path, {GROUNDING_PREFIX + k: v for k, v in heads.items()},
                  {GROUNDING_PREFIX + k: v for k, v in expected.items()})
    g.load_state_dict({k: v.to(expected[k].dtype) for k, v in heads.items()})
    return g.eval()
