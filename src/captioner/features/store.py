"""Feature store: every image encoded once into one flat float16 file, read back by row.

Layout of WORKDIR/features/<encoder>/ (and <encoder>-<view>/ for altered copies of the photos, for augmentation in
training: "flip" the mirror images, "crop1".."cropN" random crops with jittered colours, see `view_image`):
    features.f16   raw float16 (N, R, C), row i belongs to index["ids"][i]; np.memmap-able
    index.json     {"encoder": spec, "weights": "float32" | "int8", "ids": [...], "failed": {id: reason},
                    "complete": bool}

index.json doubles as the progress file. build_features appends a batch of rows, fsyncs them,
then rewrites index.json atomically, so "ids" only ever names rows that are safely on disk.
After a crash (Ctrl-C, kill -9) the file may hold rows past len(ids): a resume cuts them off and
carries on, so finished rows are never recomputed and the result is byte-identical to a clean run.
"""
from __future__ import annotations

import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import ImageEnhance, ImageOps
from tqdm import tqdm

from captioner.data.images import ImageError, load_image, preprocess
from captioner.features.encoder import EncoderSpec, get_spec
from captioner.io import atomic_write_json, read_json

FEATURES_FILE = "features.f16"
INDEX_FILE = "index.json"


def to_float16(x: np.ndarray, dtype=np.float16) -> np.ndarray:
    """Grids as the store keeps them: rounded to float16 (`dtype` np.float32 gives the rounded values as float32).
    numpy's float16 conversion is scalar code, 0.25 ms per 9x9x1280 grid each way here; torch's is vectorised
    (20x faster), so it is used where installed (the torch-free install keeps numpy's: the same values)."""
    x = np.ascontiguousarray(x)
    try:
        import torch
    except ImportError:
        return x.astype(np.float16).astype(dtype, copy=False)
    return torch.from_numpy(x).half().to(torch.float32 if dtype == np.float32 else torch.float16).numpy()


FLIP = "flip"
VIEW = re.compile(r"flip|crop[1-9][0-9]*")  # the altered copies a store can hold
CROP_AREA = (0.6, 1.0)  # share of the photo a crop keeps: a caption describes the whole scene
CROP_ASPECT = (3 / 4, 4 / 3)
JITTER = 0.25  # brightness, contrast and saturation each scaled by a factor in [1 - JITTER, 1 + JITTER]


def crop_views(n: int) -> list[str]:
    return [f"crop{k}" for k in range(1, n + 1)]


def store_dir(workdir, encoder: str, view: str = "") -> Path:
    return Path(workdir) / "features" / (f"{encoder}-{view}" if view else encoder)


def view_image(img, view: str, image_id: str):
    """The photo as `view` shows it: itself (""), mirrored ("flip"), or cropped and colour-jittered ("cropK"), the
    crop and factors drawn from (image id, K) so a store rebuilt or resumed holds the same rows."""
    if not view:
        return img
    if view == FLIP:
        return ImageOps.mirror(img)
    rng = np.random.default_rng([zlib.crc32(image_id.encode()), int(view.removeprefix("crop"))])
    area, aspect = rng.uniform(*CROP_AREA), np.exp(rng.uniform(*np.log(CROP_ASPECT)))
    w, h = img.size
    cw, ch = min(w, round(w * np.sqrt(area * aspect))), min(h, round(h * np.sqrt(area / aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.convert("RGB").crop((x, y, x + cw, y + ch))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return img


def _view_flag(view: str) -> str:
    """The `captioner features` option that builds a view's store."""
    return "" if not view else " --flip" if view == FLIP else f" --crops {view.removeprefix('crop')}"


def _row_bytes(spec: EncoderSpec) -> int:
    return spec.num_regions * spec.channels * 2


def _write_index(folder: Path, spec: EncoderSpec, ids: list[str], failed: dict, complete: bool, view: str,
                 weights: str) -> None:
    atomic_write_json(folder / INDEX_FILE, {"encoder": spec.to_dict(), "weights": weights, "view": view, "ids": ids,
                                            "failed": failed, "complete": complete}, indent=None)


def _load_batch(items: list[tuple[str, Path]], spec: EncoderSpec, view: str = ""):
    """Decode one batch -> (ids, pixels (b,3,S,S) or None, {id: reason} for the bad ones)."""
    ids, pixels, bad = [], [], {}
    for image_id, path in items:
        try:
            img = load_image(path, name=image_id)
            pixels.append(preprocess(view_image(img, view, image_id), spec))
            ids.append(image_id)
        except ImageError as e:
            bad[image_id] = str(e).removeprefix(f"{image_id}: ")
    return ids, (np.stack(pixels) if pixels else None), bad


def build_features(workdir, images_dir=None, encoder: str = "lite2", backend: str = "auto",
                   batch_size: int = 32, progress: bool = True, device: str = "cpu", view: str = "",
                   int8: bool = False) -> dict:
    """Encode every present image of a prepared WORKDIR into WORKDIR/features/<encoder>/.

    Resumable: rows already in the store are kept as they are; images that failed before are
    tried again. Bad images are left out and reported with their reason; the run carries on.
    `images_dir` looks images up as images_dir/<image_id> instead of the prepared paths.
    `view` encodes altered copies into <encoder>-<view>/ (`view_image`: "flip", "crop1", ...; augmentation in
    training).
    `int8` encodes with the shipped static-int8 graph (2.6x faster; the grids `captioner caption` computes); a
    store holds one kind of grid, so resuming with the other is refused.
    """
    from captioner.data.datasets import load_prepared
    from captioner.features.encoder import Encoder

    t0 = time.time()
    spec = get_spec(encoder)
    if view and not VIEW.fullmatch(view):
        raise ValueError(f"unknown view {view!r}; expected flip or cropK")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    data = load_prepared(workdir)
    folder = store_dir(workdir, spec.name, view)
    folder.mkdir(parents=True, exist_ok=True)

    # what there is to encode, in dataset order (fixed order -> reproducible row layout)
    images, missing = [], 0
    for r in data.records:
        path = Path(images_dir) / r.image_id if images_dir else r.path
        if path is None or (images_dir and not path.is_file()):
            missing += 1
        else:
            images.append((r.image_id, path))

    weights = "int8" if int8 else "float32"
    ids, failed_before, complete_before = _committed(folder, spec, weights)
    done = set(ids)
    # images that failed before go last, so a resumed run batches the rest exactly as a clean run did
    todo = [(i, p) for i, p in images if i not in done and i not in failed_before]
    todo += [(i, p) for i, p in images if i not in done and i in failed_before]
    in_plan = {i for i, _ in images}
    failed = {i: r for i, r in failed_before.items() if i in in_plan}  # kept until a retry succeeds

    fd = os.open(folder / FEATURES_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, len(ids) * _row_bytes(spec))  # drop rows a crash left beyond the last committed index
        if todo or not complete_before:
            _write_index(folder, spec, ids, failed, False, view, weights)
        if todo:
            enc = Encoder.load(spec.name, backend, device=device, int8=int8)
            if int8 and enc.backend != "onnx-int8":
                raise ValueError(f"{spec.name}: no int8 graph for the {enc.backend} backend "
                                 "(the shipped one runs under onnxruntime: --backend onnx)")
            t_encode = time.time()  # images/s counts decoding + encoding, not loading the model
            _encode_into(fd, folder, enc, todo, ids, failed, batch_size=batch_size, view=view, progress=progress)
        _write_index(folder, spec, ids, failed, True, view, weights)
    finally:
        os.close(fd)

    seconds = time.time() - t0
    encoded = len(ids) - len(done)
    return {"encoder": spec.name, "weights": weights, "store": str(folder), "images": len(images), "missing": missing,
            "encoded": encoded, "skipped_done": len(images) - len(todo), "failed": failed,
            "rows": len(ids), "seconds": round(seconds, 2),
            "images_per_s": round(encoded / (time.time() - t_encode), 2) if encoded else 0.0}


def _committed(folder: Path, spec: EncoderSpec, weights: str) -> tuple[list[str], dict, bool]:
    """(ids, failed, complete) of the store's index as a previous run left it; nothing when there is none."""
    if not (folder / INDEX_FILE).is_file():
        return [], {}, False
    index = read_json(folder / INDEX_FILE)
    if EncoderSpec.from_dict(index["encoder"]) != spec:
        raise ValueError(f"{folder / INDEX_FILE}: store built with "
                         f"{EncoderSpec.from_dict(index['encoder']).describe()}, asked for {spec.describe()}")
    have = index.get("weights", "float32")  # stores of earlier versions: the float encoder
    if have != weights:
        raise ValueError(f"{folder / INDEX_FILE}: store holds {have} grids, asked for {weights}; "
                         f"{'drop --int8' if have == 'float32' else 'add --int8'} or use another WORKDIR")
    return list(index["ids"]), index["failed"], bool(index["complete"])


def _encode_into(fd: int, folder: Path, enc, todo: list[tuple[str, Path]], ids: list[str], failed: dict, *,
                 batch_size: int, view: str, progress: bool) -> None:
    """Encode `todo` batch by batch, appending rows to the open features file and `ids`, bad images to
    `failed`; each batch is on disk before the index names it."""
    spec, row = enc.spec, _row_bytes(enc.spec)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    crash_after = int(os.environ.get("CAPTIONER_TEST_CRASH_AFTER", "0"))  # tests: die hard mid-run
    bar = tqdm(total=len(todo), unit="img", desc=f"features {folder.name}/{enc.backend}",
               disable=not progress, dynamic_ncols=True)
    # decode the next batch on a thread while the encoder runs (Pillow releases the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load_batch, batches[0], spec, view)
        for k in range(len(batches)):
            batch_ids, pixels, bad = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(_load_batch, batches[k + 1], spec, view)
            for image_id, reason in bad.items():
                failed[image_id] = reason
                bar.write(f"skipped {image_id}: {reason}")
            if pixels is not None:
                feats = to_float16(enc.encode(pixels))
                os.pwrite(fd, feats.tobytes(), len(ids) * row)
                os.fsync(fd)  # rows on disk before the index names them
                ids.extend(batch_ids)
                for image_id in batch_ids:
                    failed.pop(image_id, None)
            _write_index(folder, spec, ids, failed, False, view, "int8" if enc.backend == "onnx-int8" else "float32")
            bar.update(len(batches[k]))
            if crash_after and k + 1 >= crash_after:
                os._exit(99)
    bar.close()


class FeatureStore:
    """Read-only access to a finished store. Rows are read with os.pread, so the file's pages sit in
    the OS page cache (shared by every DataLoader worker), not in each process's RSS."""

    def __init__(self, folder: Path, spec: EncoderSpec, ids: list[str], failed: dict, weights: str = "float32"):
        self.folder = folder
        self.spec = spec
        self.weights = weights  # "float32" or "int8": which encoder graph made the grids
        self.ids = ids
        self.failed = failed
        self._rows = {image_id: i for i, image_id in enumerate(ids)}
        self._row_bytes = _row_bytes(spec)
        self._fd, self._pid = None, None
        size = (folder / FEATURES_FILE).stat().st_size if (folder / FEATURES_FILE).is_file() else -1
        if size < len(ids) * self._row_bytes:
            raise ValueError(f"{folder / FEATURES_FILE}: holds {max(size, 0)} bytes, "
                             f"index needs {len(ids) * self._row_bytes}; rebuild with `captioner features`")

    @classmethod
    def open(cls, workdir, encoder: str | None = None, view: str = "") -> "FeatureStore":
        """The finished store of `encoder` (None: the only one there, or lite2); `view`: its twin of altered
        copies ("flip", "crop1", ...)."""
        root = Path(workdir) / "features"
        built = sorted(q.parent.name for q in root.glob(f"*/{INDEX_FILE}")
                       if not VIEW.fullmatch(q.parent.name.rpartition("-")[2]))
        flag = _view_flag(view)
        if encoder is None:
            if not built:
                raise ValueError(f"{root}: no feature store; run `captioner features {workdir}` first")
            if len(built) > 1 and "lite2" not in built:
                raise ValueError(f"{root}: several feature stores ({', '.join(built)}); pick one with encoder=")
            encoder = built[0] if len(built) == 1 else "lite2"
        want = get_spec(encoder)
        folder = store_dir(workdir, encoder, view)
        if not (folder / INDEX_FILE).is_file():
            if built and not view:
                have = EncoderSpec.from_dict(read_json(root / built[0] / INDEX_FILE)["encoder"])
                raise ValueError(f"{root}: store built with {have.describe()}, model expects "
                                 f"{want.describe()}; run `captioner features {workdir} --encoder {encoder}`")
            raise ValueError(f"{root}: no feature store {folder.name}; "
                             f"run `captioner features {workdir} --encoder {encoder}{flag}`")
        index_file = folder / INDEX_FILE
        try:
            index = read_json(index_file)
            spec = EncoderSpec.from_dict(index["encoder"])
            ids, failed, complete = list(index["ids"]), dict(index["failed"]), bool(index["complete"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_file}: unreadable ({type(e).__name__}: {e})") from None
        if not complete:
            raise ValueError(f"{index_file}: store is incomplete ({len(ids)} rows); "
                             f"finish it with `captioner features {workdir} --encoder {encoder}{flag}`")
        store = cls(folder, spec, ids, failed, index.get("weights", "float32"))
        store.check_encoder(encoder)
        return store

    def check_encoder(self, name: str) -> None:
        want = get_spec(name)
        if want != self.spec:
            raise ValueError(f"{self.folder}: store built with {self.spec.describe()}, "
                             f"model expects {want.describe()}")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id) -> bool:
        return image_id in self._rows

    def row_of(self, image_id: str) -> int:
        try:
            return self._rows[image_id]
        except KeyError:
            raise KeyError(f"{image_id}: not in the feature store {self.folder}") from None

    def _file(self) -> int:
        # one descriptor per process: forked DataLoader workers must not share the parent's
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.folder / FEATURES_FILE, os.O_RDONLY), os.getpid()
        return self._fd

    def get(self, image_ids: list[str]) -> np.ndarray:
        """(B, R, C) float32 for these images, in the order given."""
        fd, n = self._file(), self._row_bytes
        out = np.empty((len(image_ids), self.spec.num_regions, self.spec.channels), np.float16)
        for b, image_id in enumerate(image_ids):
            buf = os.pread(fd, n, self.row_of(image_id) * n)
            out[b] = np.frombuffer(buf, np.float16).reshape(out.shape[1:])
        return to_float16(out, np.float32)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):  # picklable for spawned DataLoader workers; they reopen the file
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
