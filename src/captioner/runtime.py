"""The two decoders behind Captioner (apps/api.py): the same model, run by torch or by onnxruntime.

Both take encoder grids (B, R, C) as numpy and give the grounding heads' four outputs (numpy) and the n-best
captions, searched by the same numpy beam search (beam.py). Captioner chooses: torch where it is installed
(its int8 decoder step is the faster one at batch 1), the ONNX graphs of a model folder (pretrained.py) where it
is not, so `pip install captioner` captions with onnxruntime, numpy and Pillow alone.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from captioner.beam import Caption, beam_search
from captioner.describe import Describer, GroundingSettings


@contextmanager
def _torch_threads(n: int):
    """Run the block on n intra-op threads, then restore. The decoder's matmuls are tiny: on a busy 2-core
    machine, 2 OpenMP threads waiting on each other made beam search 10-20x slower than 1 (benchmarks/latency.py)."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _traced_step(model, spec):
    """model.step as a TorchScript trace: the same numbers (tests/test_api.py compares the search over it with
    decode.decode bit for bit), a third less Python and dispatch overhead a step at batch 1 (benchmarks/latency.py).
    Traced once on a blank grid (0.1 s); batch, beam and region counts stay free, as the step reads its shapes.
    torch.jit.trace is deprecated for torch.compile, which would need a C++ toolchain and seconds at start-up."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, state):
            return self.model.step(tokens, state)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice; the LSTM cell's input checks, constant here
        state = model.init_state(torch.zeros(1, spec.grid[0] * spec.grid[1], spec.channels))
        return torch.jit.trace(Step().eval(), (torch.zeros(1, dtype=torch.long), state), check_trace=False)


class TorchRuntime:
    """A checkpoint (checkpoint.py) decoded by decode.decode, with int8 weights when the checkpoint has the
    activation ranges measured when it shipped (older ones decode in float)."""
    name = "torch"
    encoder_paths: dict = {}  # a model folder's encoder graphs {"float", "int8"} (open_runtime sets them)

    def __init__(self, checkpoint, *, int8: bool = True, grounded: bool = True):
        from captioner.features.encoder import get_spec
        from captioner.model import quantize_int8
        self.checkpoint = checkpoint
        self.vocab, self.config, self.meta, self.path = checkpoint.vocab, checkpoint.config, checkpoint.meta, checkpoint.path
        ranges = checkpoint.meta.get("int8_ranges")
        self.int8 = bool(int8 and ranges)
        self.model = quantize_int8(checkpoint.model, ranges) if self.int8 else checkpoint.model
        self.step = _traced_step(self.model, get_spec(self.config.encoder))
        self.grounding = checkpoint.grounding if grounded else None
        self.describer = self.grounding.describer() if self.grounding is not None else None

    def heads(self, feats: np.ndarray):
        import torch
        with _torch_threads(1), torch.inference_mode():
            return tuple(t.numpy() for t in self.grounding(torch.from_numpy(feats)))

    def decode(self, feats: np.ndarray, bias: np.ndarray | None, *, beam_size: int, max_len: int, n_best: int,
               return_attention: bool = False) -> list[list[Caption]]:
        """The torch model's steps, searched by beam.beam_search like the ONNX graphs (one search for both)."""
        import torch
        model = self.model

        def step(tokens, state):
            logits, alpha, state = self.step(torch.from_numpy(tokens), state)
            return logits.numpy(), alpha.numpy(), state

        def select(state, rows, images):
            return model.select_state(state, torch.from_numpy(rows),
                                      None if images is None else torch.from_numpy(images))

        with _torch_threads(1), torch.inference_mode():
            return beam_search(step, select, model.init_state(torch.from_numpy(feats)), self.vocab, len(feats),
                               beam_size=beam_size, max_len=max_len, n_best=n_best, bias=bias,
                               return_attention=return_attention)


class OnnxRuntime:
    """A model folder's ONNX graphs run by onnxruntime, searched by beam.beam_search: no torch."""
    name = "onnx"
    int8 = False

    def __init__(self, folder, *, grounded: bool = True):
        from captioner.features.encoder import _ort_session
        from captioner.pretrained import read_model_folder
        info = read_model_folder(folder)
        self.info, self.vocab, self.config, self.meta = info, info["vocab"], info["config"], info["meta"]
        self.path = Path(folder)
        paths = info["paths"]
        # one thread each: the decoder's products are tiny (see _torch_threads)
        self._init = _ort_session(str(paths["decoder_init"]), 1)
        self._step = _ort_session(str(paths["decoder_step"]), 1)
        g = info.get("grounding") if grounded else None
        self._heads = _ort_session(str(paths["grounding"]), 1) if g else None
        self.describer = Describer(GroundingSettings.from_dict(g["settings"]), g["learnt"]) if g else None

    @property
    def encoder_paths(self) -> dict:
        return _encoder_paths(self.info)

    def heads(self, feats: np.ndarray):
        out = tuple(self._heads.run(None, {"features": feats}))
        return out if len(out) == 4 else (*out, None)  # folders exported before the region head: no regions

    def decode(self, feats: np.ndarray, bias: np.ndarray | None, *, beam_size: int, max_len: int, n_best: int,
               return_attention: bool = False) -> list[list[Caption]]:
        state = tuple(self._init.run(None, {"features": feats}))

        def step(tokens, state):
            logits, alpha, h, c = self._step.run(None, {"tokens": tokens, "values": state[0], "keys": state[1],
                                                         "h": state[2], "c": state[3]})
            return logits, alpha, (state[0], state[1], h, c)

        return beam_search(step, lambda state, rows, images: tuple(s[rows] for s in state), state, self.vocab, len(feats),
                           beam_size=beam_size, max_len=max_len, n_best=n_best, bias=bias,
                           return_attention=return_attention)


def open_runtime(path: Path, runtime: str = "auto", *, int8: bool = True, grounded: bool = True):
    """The runtime for a checkpoint file or a model folder. "auto": torch where it is installed."""
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"unknown runtime {runtime!r}; expected auto, torch or onnx")
    try:  # imported, not just found: a broken torch install falls back to the graphs too
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    runtime = ("torch" if has_torch else "onnx") if runtime == "auto" else runtime
    folder = path if path.is_dir() else None
    if runtime == "onnx":
        if folder is None:
            raise ValueError(f"{path}: running without torch needs a model folder with ONNX graphs; "
                             f"`captioner export DIR --model {path}` writes one (where torch is installed)")
        return OnnxRuntime(folder, grounded=grounded)
    if not has_torch:
        raise ValueError(f"{path}: torch is not installed; pip install 'captioner[train]', or use a model folder")
    from captioner.checkpoint import load_checkpoint
    from captioner.pretrained import read_model_folder
    info = read_model_folder(folder) if folder else None
    rt = TorchRuntime(load_checkpoint(info["paths"]["weights"] if info else path), int8=int8, grounded=grounded)
    if info:
        rt.encoder_paths = _encoder_paths(info)  # the folder's graphs: no export on first run
    return rt


def _encoder_paths(info: dict) -> dict:
    return {"float": info["paths"]["encoder"], "int8": info["paths"].get("encoder_int8")}
