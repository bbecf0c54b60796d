"""The Python API: caption photos with a trained model in three lines.

    from captioner import Captioner
    c = Captioner.load()              # the shipped Flickr8k model
    print(c.caption("photo.jpg").caption)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from captioner.checkpoint import Checkpoint, load_checkpoint
from captioner.decode import decode
from captioner.features.encoder import Encoder, ImageError, get_spec, load_image, preprocess
from captioner.model import quantize_int8


@dataclass
class CaptionResult:
    caption: str
    score: float
    tokens: list[str]
    alternatives: list[dict] = field(default_factory=list)  # [{"caption", "score"}], best first
    attention: np.ndarray | None = None  # (len(tokens), gh, gw): where the model looked for each word
    source: str | None = None

    def to_dict(self, attention: bool = False) -> dict:
        d = {"caption": self.caption, "score": self.score, "tokens": self.tokens,
             "alternatives": self.alternatives, "source": self.source}
        if attention and self.attention is not None:
            d["attention"] = np.round(self.attention, 4).tolist()
        return d


@contextmanager
def _torch_threads(n: int):
    """Run the block on n intra-op threads, then restore. The decoder's matmuls are tiny: on a busy 2-core
    machine, 2 OpenMP threads waiting on each other made beam search 10-20x slower than 1 (benchmarks/latency.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _name(src) -> str | None:
    return str(src) if isinstance(src, (str, Path)) else getattr(src, "filename", None) or None


class Captioner:
    """A trained checkpoint plus the image encoder it was trained with."""

    def __init__(self, checkpoint: Checkpoint, encoder: Encoder, *, beam_size: int = 3, max_len: int = 30,
                 int8: bool = True):
        if encoder.spec.name != checkpoint.config.encoder:
            raise ValueError(f"{checkpoint.path}: model was trained on {checkpoint.config.encoder} features, "
                             f"encoder is {encoder.spec.name}")
        self.checkpoint, self.encoder = checkpoint, encoder
        self.model = quantize_int8(checkpoint.model) if int8 else checkpoint.model
        self.vocab, self.int8 = checkpoint.vocab, int8
        self.beam_size, self.max_len = beam_size, max_len

    @classmethod
    def load(cls, path=None, *, backend: str = "auto", beam_size: int = 3, max_len: int = 30,
             int8: bool = True) -> "Captioner":
        """`path` None loads the shipped Flickr8k model; `backend` picks onnxruntime or torch for the CNN;
        `int8` decodes with int8 weights (several times faster at batch 1; False: the float weights)."""
        ckpt = load_checkpoint(path)
        return cls(ckpt, Encoder.load(ckpt.config.encoder, backend=backend), beam_size=beam_size, max_len=max_len,
                   int8=int8)

    @property
    def info(self) -> dict:
        spec = get_spec(self.checkpoint.config.encoder)
        meta = self.checkpoint.meta
        return {"name": meta.get("name", self.checkpoint.path.stem), "path": str(self.checkpoint.path),
                "encoder": spec.name, "input_size": spec.input_size, "grid": list(spec.grid),
                "vocab_size": len(self.vocab), "dev_scores": meta.get("dev_scores", meta.get("dev_scores_greedy")),
                "beam_size": self.beam_size, "backend": self.encoder.backend,
                "decoder_weights": "int8" if self.int8 else "float32"}

    def caption(self, image, *, beam_size: int | None = None, n_best: int = 1,
                attention: bool = False) -> CaptionResult:
        """One image (path, bytes or PIL image) -> its caption. Unreadable images raise ImageError."""
        result = self.caption_batch([image], beam_size=beam_size, n_best=n_best, attention=attention)[0]
        if isinstance(result, ImageError):
            raise result
        return result

    def caption_batch(self, images: list, *, beam_size: int | None = None, n_best: int = 1,
                      attention: bool = False) -> list[CaptionResult | ImageError]:
        """Many images in one encoder and one decoder batch; unreadable ones come back as their ImageError."""
        spec = self.encoder.spec
        out: list = [None] * len(images)
        pixels, slots = [], []
        for i, src in enumerate(images):
            try:
                pixels.append(preprocess(load_image(src, name=_name(src)), spec))
                slots.append(i)
            except ImageError as e:
                out[i] = e
        if slots:
            feats = torch.from_numpy(self.encoder.encode(np.stack(pixels)))
            with _torch_threads(1), torch.inference_mode():
                beams = decode(self.model, self.vocab, feats, beam_size=beam_size or self.beam_size,
                               max_len=self.max_len, n_best=max(1, n_best), return_attention=attention)
            for i, hyps in zip(slots, beams):
                best = hyps[0]
                att = None
                if attention and best.attention is not None:
                    att = best.attention.reshape(len(best.tokens), *spec.grid)
                out[i] = CaptionResult(best.text, round(best.score, 4), best.tokens,
                                       [{"caption": h.text, "score": round(h.score, 4)} for h in hyps],
                                       att, _name(images[i]))
        return out
