"""Model folders: a trained model as files other tools and people can pass around, runnable without torch.

    my-model/
      config.json          format, Config, encoder, grounding settings, decoding defaults, metadata, ONNX check
      vocab.json           the vocabulary, index order
      model.safetensors    the checkpoint (checkpoint.py): weights + the same header, for torch and training
      encoder.onnx         pixels (B, 3, S, S) -> grid (B, R, C)
      encoder_int8.onnx    the same, static int8 (where the encoder has a shipped int8 graph)
      decoder_init.onnx    grid -> the decoder's per-image state (projected grid, attention keys, h, c)
      decoder_step.onnx    previous words + state -> next-word logits, attention, next state
      grounding.onnx       grid -> concepts, evidence, familiarity, regions (models with grounding heads)
      README.md            the model card

`save_pretrained` (and `captioner export DIR`) writes one from a checkpoint and checks every ONNX graph against
the torch model it came from (ONNX_TOLERANCE); `read_model_folder` validates one without torch; runtime.py runs it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from captioner import __version__
from captioner.config import Config
from captioner.data.vocab import Vocabulary
from captioner.io import atomic_write_json

FORMAT = "captioner-model/1"
# max |onnx - torch| allowed on any output of the decoder and grounding graphs (measured: ~1e-6)
ONNX_TOLERANCE = 1e-4
FILES = {"weights": "model.safetensors", "encoder": "encoder.onnx", "encoder_int8": "encoder_int8.onnx",
         "decoder_init": "decoder_init.onnx", "decoder_step": "decoder_step.onnx", "grounding": "grounding.onnx"}


def default_model_path() -> Path:
    """The shipped Flickr8k model: its model folder where one was built (the wheel ships only that), else the
    checkpoint file in the source tree."""
    assets = Path(__file__).resolve().parent / "assets"
    folder = assets / "flickr8k"
    return folder if (folder / "config.json").is_file() else assets / "flickr8k-sat.safetensors"


def read_model_folder(folder) -> dict:
    """config.json, checked, with the vocabulary and the absolute path of every file it names."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json); `captioner export DIR` writes one")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != FORMAT:
        newer = isinstance(fmt, str) and fmt.startswith("captioner-model/")
        raise ValueError(f"{path}: format {fmt!r}, this captioner {__version__} reads {FORMAT!r}"
                         + ("; upgrade captioner" if newer else ""))
    try:
        info["config"] = Config.from_dict(info["config"])
        info["vocab"] = Vocabulary.from_dict(json.loads((folder / "vocab.json").read_text()))
        info["paths"] = {k: folder / name for k, name in info["files"].items() if name}
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"{folder}: damaged model folder ({e})") from None
    for key, p in info["paths"].items():
        if key != "weights" and not p.is_file():
            raise ValueError(f"{p}: missing; the model folder is incomplete (re-export it)")
    info["folder"] = folder
    return info


# --- writing a folder (needs torch) -------------------------------------------------------------------

def _graph_modules(checkpoint):
    """torch modules with the exact inputs and outputs of the three decoder-side graphs."""
    import torch

    model = checkpoint.model

    class Init(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, features):
            return self.model.init_state(features)

    class Step(torch.nn.Module):
        """One row per hypothesis: each row carries its image's projected grid and keys (the search copies them
        per beam), so the graph needs no image index."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens, values, keys, h, c):
            logits, alpha, (_, _, h, c) = self.model.step(tokens, (values, keys, h, c))
            return logits, alpha, h, c

    return Init().eval(), Step().eval()


def _export(module, args: tuple, names: list[str], outputs: list[str], dims: dict, path: Path) -> None:
    import contextlib
    import io
    import logging
    import warnings

    import torch
    quiet = logging.getLogger("torch.onnx")  # "torchvision is not installed" lines, nothing of ours
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=outputs,
                                        dynamic_shapes=dims, verbose=False)
    finally:
        quiet.setLevel(level)
    path.write_bytes(program.model_proto.SerializeToString())


def _check_inputs(config: Config, vocab_size: int, n: int = 2, beams: int = 3):
    rng = np.random.default_rng(0)
    grid = rng.uniform(0, 3, (n, config.num_regions, config.feature_dim)).astype(np.float16).astype(np.float32)
    tokens = rng.integers(4, vocab_size, n * beams)
    return grid, tokens


def _max_errors(folder: Path, checkpoint, has_heads: bool) -> dict:
    """max |onnx - torch| of every output of the decoder and grounding graphs on random grids and words."""
    import torch

    from captioner.features.encoder import _ort_session
    # another batch size than the export's: a graph whose batch axis came out fixed fails here
    grid, tokens = _check_inputs(checkpoint.config, len(checkpoint.vocab), n=3, beams=2)
    errors = {}
    with torch.inference_mode():
        state = checkpoint.model.init_state(torch.from_numpy(grid))
        got = _ort_session(str(folder / FILES["decoder_init"]), 1).run(None, {"features": grid})
        errors["decoder_init"] = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, state))
        rows = torch.arange(len(grid)).repeat_interleave(len(tokens) // len(grid))
        values, keys, h, c = (s.index_select(0, rows) for s in state)
        want = checkpoint.model.step(torch.from_numpy(tokens), (values, keys, h, c))
        feed = {"tokens": tokens.astype(np.int64), "values": values.numpy(), "keys": keys.numpy(), "h": h.numpy(),
                "c": c.numpy()}
        got = _ort_session(str(folder / FILES["decoder_step"]), 1).run(None, feed)
        errors["decoder_step"] = max(float(np.abs(g - w.numpy()).max())
                                     for g, w in zip(got, (want[0], want[1], *want[2][2:])))
        if has_heads:
            want = checkpoint.grounding(torch.from_numpy(grid))
            got = _ort_session(str(folder / FILES["grounding"]), 1).run(None, {"features": grid})
            errors["grounding"] = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    return errors


def save_pretrained(source, folder, *, card: str | None = None, beam_size: int = 3, max_len: int = 30) -> dict:
    """Write the model folder for checkpoint `source` (a path; None: the shipped model) at `folder`, replacing a
    model folder already there; returns its config.json. Refuses, naming the graph, when an ONNX graph
    disagrees with the torch model by more than ONNX_TOLERANCE. `card` is the model card's Markdown (default:
    one written from the checkpoint's metadata)."""
    import torch

    from captioner.checkpoint import load_checkpoint
    from captioner.features.encoder import exported_onnx, get_spec, int8_path
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: exists and is not a model folder; choose an empty or new folder")
    source = Path(source) if source is not None else default_model_path()
    if source.is_dir():
        source = source / FILES["weights"]
    ckpt = load_checkpoint(source)
    spec_name = ckpt.config.encoder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is for sharing
    try:
        shutil.copyfile(source, tmp / FILES["weights"])
        shutil.copyfile(exported_onnx(get_spec(spec_name)), tmp / FILES["encoder"])
        int8 = int8_path(get_spec(spec_name))
        if int8:
            shutil.copyfile(int8, tmp / FILES["encoder_int8"])
        init, step = _graph_modules(ckpt)
        grid, tokens = (torch.from_numpy(a) for a in _check_inputs(ckpt.config, len(ckpt.vocab)))
        images, rows = torch.export.Dim("images"), torch.export.Dim("rows")
        _export(init, (grid,), ["features"], ["values", "keys", "h", "c"], {"features": {0: images}},
                tmp / FILES["decoder_init"])
        with torch.inference_mode():
            state = [s.repeat_interleave(3, 0) for s in ckpt.model.init_state(grid)]
        _export(step, (tokens, *state), ["tokens", "values", "keys", "h", "c"], ["logits", "alpha", "h_next", "c_next"],
                {"tokens": {0: rows}, "values": {0: rows}, "keys": {0: rows}, "h": {0: rows}, "c": {0: rows}},
                tmp / FILES["decoder_step"])
        if ckpt.grounding is not None:
            _export(ckpt.grounding, (grid,), ["features"], ["concepts", "evidence", "familiarity", "regions"],
                    {"grid": {0: images}}, tmp / FILES["grounding"])
        # checked against a fresh copy of the model: the exporter has been seen to disturb the live one
        errors = _max_errors(tmp, load_checkpoint(source), ckpt.grounding is not None)
        worst = max(errors, key=errors.get)
        if not errors[worst] <= ONNX_TOLERANCE:
            raise RuntimeError(f"{worst}.onnx disagrees with the torch model by {errors[worst]:.1e} "
                               f"(tolerance {ONNX_TOLERANCE:.0e})")
        info = {"format": FORMAT, "captioner_version": __version__, "name": ckpt.meta.get("name", source.stem),
                "config": json.loads(ckpt.config.to_json()), "encoder": ckpt.config.encoder,
                "grounding": None if ckpt.grounding is None else {
                    "settings": ckpt.grounding.settings_dict(), "learnt": ckpt.grounding.learnt.tolist()},
                "decoding": {"beam_size": beam_size, "max_len": max_len},
                "files": {**FILES, "grounding": FILES["grounding"] if ckpt.grounding is not None else None,
                          "encoder_int8": FILES["encoder_int8"] if int8 else None},
                "onnx_check": {"tolerance": ONNX_TOLERANCE, "max_abs_error": errors}, "meta": ckpt.meta}
        atomic_write_json(tmp / "vocab.json", ckpt.vocab.to_dict())
        atomic_write_json(tmp / "config.json", info)
        (tmp / "README.md").write_text(card or model_card(info))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_card(info: dict) -> str:
    """A model card from a folder's config.json: what the model is, how to use it, its recorded scores."""
    meta, cfg = info["meta"], info["config"]
    lines = [f"# {info['name']}", "",
             f"An image-captioning model of the Show, Attend and Tell family, made with captioner "
             f"{info['captioner_version']}: encoder {info['encoder']} (frozen, ImageNet weights), LSTM decoder "
             f"with soft attention ({cfg['decoder_dim']} units), {'with' if info['grounding'] else 'without'} "
             "grounding heads.", "",
             "## Use", "", "```", "captioner caption --model THIS_FOLDER photo.jpg",
             "python -c \"from captioner import Captioner; print(Captioner.load('THIS_FOLDER').caption('photo.jpg').text)\"",
             "```", "Without torch installed the ONNX graphs run it (onnxruntime, numpy and Pillow only).", "",
             "## Training", "", f"Data: {meta.get('workdir', 'not recorded')}; objective {cfg['objective']}, "
             f"{cfg['epochs']} epochs at most, batch {cfg['batch_size']}, lr {cfg['lr']}.", ""]
    scores = meta.get("dev_scores") or {}
    if scores:
        lines += ["## Dev-split scores (x100)", "", "| decoding | BLEU-4 | METEOR | CIDEr-D | CHAIR-s |", "|---|---|---|---|---|"]
        for name, s in scores.items():
            if isinstance(s, dict):
                f = lambda k: "-" if s.get(k) is None else f"{100 * s[k]:.1f}"
                lines.append(f"| {name} | {f('bleu4')} | {f('meteor')} | {f('cider')} | {f('chair_s')} |")
        lines.append("")
    lines += ["## Limitations", "", "It names only words of its training captions' vocabulary and, trained on "
              "one dataset, describes photos unlike that dataset's less truthfully; read the confidence.", ""]
    return "\n".join(lines)
