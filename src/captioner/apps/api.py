"""The Python API: caption photos with a trained model in three lines.

    from captioner import Captioner
    c = Captioner.load()              # the shipped Flickr8k model
    print(c.caption("photo.jpg").caption)
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioner.data.images import ImageError, load_image, preprocess
from captioner.features.encoder import Encoder, get_spec, int8_path
from captioner.features.store import to_float16
from captioner.pretrained import default_model_path
from captioner.runtime import open_runtime


@dataclass
class CaptionResult:
    """One photo's description. `caption` is the model's sentence; `text` is what to show or say to a person:
    the caption, mended where it cannot be meant ("a man with a video camera", not "sitting on" it) and with an
    object it missed ("... with a table"), "Probably ..." when its objects are weakly backed,
    the concepts alone ("a picture of a cup and coffee") or "Not sure what this photo shows" (describe.Describer)."""
    caption: str
    score: float
    tokens: list[str]
    alternatives: list[dict] = field(default_factory=list)  # [{"caption", "score"}], best first
    attention: np.ndarray | None = None  # (len(tokens), gh, gw): where the model looked for each word
    source: str | None = None
    text: str = ""
    # evidence of the least supported object named, or for concepts alone how often such concepts are right
    # (describe.py); None: no heads
    confidence: float | None = None
    concepts: list[dict] = field(default_factory=list)  # [{"word", "p"}]: what the photo evidently shows

    def __post_init__(self):
        self.text = self.text or self.caption

    def to_dict(self, attention: bool = False) -> dict:
        """The one serialisation: JSON output, the server, the library rows."""
        d = {"text": self.text, "caption": self.caption, "confidence": self.confidence,
             "concepts": self.concepts, "score": self.score, "tokens": self.tokens,
             "alternatives": self.alternatives, "source": self.source}
        if attention and self.attention is not None:
            d["attention"] = np.round(self.attention, 4).tolist()
        return d


def _name(src) -> str | None:
    return str(src) if isinstance(src, (str, Path)) else getattr(src, "filename", None) or None


class Captioner:
    """The one inference path: preprocessing, the encoder, the decoder, its vocabulary, the grounding heads and
    the decoding settings, loaded once from one checkpoint or model folder and used by every surface."""

    def __init__(self, model, encoder: Encoder | None = None, *, beam_size: int = 3, max_len: int = 30,
                 int8: bool = True, grounded: bool = True, backend: str = "auto", threads: int | None = None):
        """`model` is a checkpoint (checkpoint.load_checkpoint; decoded by torch, with `int8` and `grounded`) or a
        runtime from runtime.open_runtime. `encoder` None loads the model's encoder (with `backend`) when the
        first image needs it: a caller with cached grids (`evaluate` on a feature store) never pays for it."""
        if not hasattr(model, "decode"):
            from captioner.runtime import TorchRuntime
            model = TorchRuntime(model, int8=int8, grounded=grounded)
        self.runtime = model
        self.spec = get_spec(model.config.encoder)
        if encoder is not None and encoder.spec.name != self.spec.name:
            raise ValueError(f"{model.path}: model was trained on {self.spec.name} features, "
                             f"encoder is {encoder.spec.name}")
        self._encoder, self._backend, self._threads, self._int8 = encoder, backend, threads, int8
        self.vocab = model.vocab
        self.beam_size, self.max_len = beam_size, max_len
        # what to say from the concept and evidence heads (describe.py); None: plain captions
        self.describer = model.describer

    @classmethod
    def load(cls, path=None, *, runtime: str = "auto", backend: str = "auto", beam_size: int = 3, max_len: int = 30,
             int8: bool = True, grounded: bool = True, threads: int | None = None) -> "Captioner":
        """`path`: a checkpoint file or a model folder (pretrained.py); None: the shipped Flickr8k model.
        `int8` False runs the float encoder and decoder (the int8 ones are 2-3x faster, same dev scores:
        benchmarks/int8_encoder.py, benchmarks/levers.py --int8).
        `runtime` "torch" decodes with torch, "onnx" with a model folder's graphs and no torch; "auto": torch if
        installed. `backend` picks onnxruntime or torch for the CNN;
        `grounded` False ignores the concept and evidence heads (plain Show, Attend and Tell); `threads` caps
        onnxruntime's encoder threads (None: one per core)."""
        rt = open_runtime(Path(path) if path is not None else default_model_path(), runtime, int8=int8,
                          grounded=grounded)
        c = cls(rt, beam_size=beam_size, max_len=max_len, int8=int8, backend=backend, threads=threads)
        c.encoder  # loaded now, so a broken encoder fails here and the first photo is not slow
        return c

    from_pretrained = load

    def save_pretrained(self, folder, **options) -> dict:
        """Write this model as a model folder (pretrained.save_pretrained; needs torch)."""
        from captioner.pretrained import save_pretrained
        return save_pretrained(self.runtime.path, folder, beam_size=self.beam_size, max_len=self.max_len, **options)

    def _encoder_graph(self) -> tuple[Path | None, bool]:
        """(ONNX graph to run, whether it is the int8 one): a model folder's graph (its int8 one unless `int8` is
        False), else the shipped int8 graph of the encoder; (None, False): Encoder.load's float export."""
        if self._backend not in ("auto", "onnx"):
            return None, False
        folder = getattr(self.runtime, "encoder_paths", {})
        int8 = folder.get("int8") if folder else int8_path(self.spec)
        if self._int8 and int8:
            return int8, True
        return folder.get("float"), False

    @property
    def int8_encoder(self) -> bool:
        """Whether photos go through a static-int8 encoder (known without loading it)."""
        return self._encoder.backend == "onnx-int8" if self._encoder is not None else self._encoder_graph()[1]

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            graph, int8 = self._encoder_graph()
            self._encoder = Encoder.from_onnx(self.spec.name, graph, threads=self._threads, int8=int8) if graph \
                else Encoder.load(self.spec.name, backend=self._backend, threads=self._threads)
        return self._encoder

    @property
    def info(self) -> dict:
        spec, rt = self.spec, self.runtime
        meta = rt.meta
        return {"name": meta.get("name", rt.path.stem), "path": str(rt.path),
                "encoder": spec.name, "input_size": spec.input_size, "grid": list(spec.grid),
                "vocab_size": len(self.vocab), "dev_scores": meta.get("dev_scores", meta.get("dev_scores_greedy")),
                "beam_size": self.beam_size, "backend": self.encoder.backend, "runtime": rt.name,
                "decoder_weights": "int8" if rt.int8 else "float32", "grounded": self.describer is not None}

    def caption(self, image, *, beam_size: int | None = None, n_best: int = 1,
                attention: bool = False) -> CaptionResult:
        """One image -> its caption. An image is a path, bytes, a binary file object (open(..., "rb"), BytesIO),
        a PIL image or a uint8 array (HxWx3, HxW greyscale, HxWx4 RGBA). Unreadable images raise ImageError."""
        result = self.caption_batch([image], beam_size=beam_size, n_best=n_best, attention=attention)[0]
        if isinstance(result, ImageError):
            raise result
        return result

    def caption_batch(self, images: list, *, beam_size: int | None = None, n_best: int = 1,
                      attention: bool = False) -> list[CaptionResult | ImageError]:
        """Many images in one encoder and one decoder batch; unreadable ones come back as their ImageError."""
        spec = self.spec
        out: list = [None] * len(images)
        pixels, slots = [], []
        for i, src in enumerate(images):
            try:
                pixels.append(preprocess(load_image(src, name=_name(src)), spec))
                slots.append(i)
            except ImageError as e:
                out[i] = e
        if slots:
            feats = self.encoder.encode(np.stack(pixels))
            results = self.caption_features(feats, beam_size=beam_size, n_best=n_best, attention=attention)
            for i, r in zip(slots, results):
                r.source = _name(images[i])
                out[i] = r
        return out

    def caption_iter(self, images: Iterable, batch_size: int = 16, progress: bool | None = None,
                     **options) -> Iterator[CaptionResult | ImageError]:
        """caption_batch over any number of images, `batch_size` at a time: results (or ImageErrors) are
        yielded in order as each batch finishes, so a long list or a generator streams. `progress` None
        shows a tqdm bar on stderr for inputs of known length over 20; `options` go to caption_batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        total = len(images) if isinstance(images, Sized) else None
        show = progress if progress is not None else total is not None and total > 20
        items = iter(images)
        with tqdm(total=total, unit="img", file=sys.stderr, disable=not show) as bar:
            while batch := list(islice(items, batch_size)):
                yield from self.caption_batch(batch, **options)
                bar.update(len(batch))

    def caption_features(self, feats, *, beam_size: int | None = None, n_best: int = 1,
                         attention: bool = False) -> list[CaptionResult]:
        """Encoder grids (B, R, C) -> results: the decoding every surface uses (API, CLI, server, library,
        alt text, `evaluate`), so what is scored is what people get."""
        # rounded to float16 as the feature store keeps grids, so a photo gets the same caption whether its grid
        # was just computed (caption, serve) or read from a store (evaluate)
        feats = to_float16(feats, np.float32)
        bias = concepts = evidence = familiar = regions = None
        if self.describer is not None:
            concepts, evidence, familiarity, regions = self.runtime.heads(feats)
            familiar = self.describer.familiar(concepts, familiarity)
            bias = self.describer.word_bias(concepts, evidence, familiar, self.vocab.itos)
        beams = self.runtime.decode(feats, bias, beam_size=beam_size or self.beam_size, max_len=self.max_len,
                                    n_best=max(1, n_best), return_attention=attention)
        out = []
        for k, hyps in enumerate(beams):
            best = hyps[0]
            said = {} if self.describer is None else \
                self.describer.describe(best.text, concepts[k], evidence[k], bool(familiar[k]),
                                        None if regions is None else regions[k])
            att = None
            if attention and best.attention is not None:
                att = best.attention.reshape(len(best.tokens), *self.spec.grid)
            out.append(CaptionResult(best.text, round(best.score, 4), best.tokens,
                                     [{"caption": h.text, "score": round(h.score, 4)} for h in hyps], att, None,
                                     **said))
        return out
