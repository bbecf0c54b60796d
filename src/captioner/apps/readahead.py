"""Captioning many files with reading overlapped: while one batch is encoded and decoded, threads read, decode
and resize the next ones (Pillow and onnxruntime release the GIL, so the JPEG decoding runs beside the CNN
instead of between its calls). The photos still go through `Captioner.caption_batch`, as images already
reduced to the encoder's input, so each gets exactly the caption it gets alone (tests/test_readahead.py)."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from PIL import Image

from captioner.data.images import ImageError, load_image


def _read(path, side: int):
    """A file -> its upright RGB image at the encoder's input size (what preprocess resizes to), or its error.
    Resizing here leaves caption_batch a same-size resize, which Pillow does as a copy."""
    try:
        return load_image(path, name=str(path)).resize((side, side), Image.BICUBIC)
    except ImageError as e:
        return e


def read_ahead(paths: list, batch_size: int, side: int, *, threads: int = 2,
               ahead: int = 2) -> Iterator[tuple[list, list]]:
    """(batch of paths, [image or ImageError]) in order, with up to `ahead` further batches being read on
    `threads` threads. Closing the generator early (an interrupt) drops the reads not yet started."""
    batches = iter([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)])
    pool = ThreadPoolExecutor(threads, thread_name_prefix="read-ahead")
    pending: deque = deque()

    def submit():
        batch = next(batches, None)
        if batch is not None:
            pending.append((batch, [pool.submit(_read, p, side) for p in batch]))

    try:
        for _ in range(1 + ahead):
            submit()
        while pending:
            batch, futures = pending.popleft()
            submit()
            yield batch, [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def caption_paths(captioner, paths: list, batch_size: int = 16, **kwargs) -> Iterator[tuple[list, list]]:
    """(batch of paths, [CaptionResult or ImageError]) for every batch, in order; `kwargs` go to
    caption_batch (beam_size, n_best, attention). A result's `source` is its path. Anything else with a
    caption_batch but no encoder `spec` (the tests' stand-ins) is handed the paths, without reading ahead."""
    spec = getattr(captioner, "spec", None)
    if spec is None:
        for i in range(0, len(paths), batch_size):
            yield paths[i:i + batch_size], captioner.caption_batch(paths[i:i + batch_size], **kwargs)
        return
    for batch, items in read_ahead(paths, batch_size, spec.input_size):
        good = [x for x in items if not isinstance(x, ImageError)]
        results = iter(captioner.caption_batch(good, **kwargs) if good else [])
        out = [x if isinstance(x, ImageError) else next(results) for x in items]
        for path, r in zip(batch, out):
            if not isinstance(r, ImageError):
                r.source = str(path) if isinstance(path, (str, Path)) else r.source
        yield batch, out
