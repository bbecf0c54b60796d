"""Caption a photo archive on a Ray cluster: `captioner caption DIR --ray [ADDRESS] --out results.jsonl`.

Ray Data spreads the photos over an actor pool; each actor loads the Captioner once and captions whole
batches with `Captioner.caption_batch` (the one inference path). The batches are those `captioner caption
--batch-size N` makes (consecutive N of the path list, also on a rerun), so the file holds exactly the
single-process captions: the decoder's last digits depend slightly on the batch (1 caption of 200 differed
when Ray Data formed its own batches; benchmarks/ray_throughput.py).

The driver appends one JSON line per photo to the output as batches come back, so a killed job loses at most
the batches in flight: a rerun reads the file, drops a half-written last line and captions only the photos
it does not hold. Photos that cannot be read are reported on stderr and not written, so a rerun tries them
again.

Paths are local files (on a cluster: a folder every node mounts at the same path) or URIs of any filesystem
pyarrow knows (s3://, gs://, hdfs://, file://), which the actors read themselves.

Needs the `[ray]` extra: pip install 'captioner[ray]'.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from captioner.apps.library import IMAGE_EXTS

RECORD_FIELDS = ("path", "text", "caption", "confidence", "concepts", "score", "model")


def is_uri(spec: str) -> bool:
    return "://" in str(spec)


def list_uri_images(uri: str) -> list[str]:
    """Image files under a URI folder (recursively) or the URI of one file, sorted, as URIs."""
    from pyarrow import fs as pafs
    filesystem, root = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    names = sorted(f.path for f in found if f.type == pafs.FileType.File
                   and os.path.splitext(f.path)[1].lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in f.path[len(root):].split("/")))
    return [f"{scheme}://{n}" for n in names]


def read_done(out: Path) -> set[str]:
    """Paths already in the output. A last line without its newline (the job was killed while writing it)
    is cut off, so the next record starts on a line of its own."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    done = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{out}: line {n} is not a caption record; not appending to it") from None
    return done


def _source(path: str):
    """What caption_batch reads: a local path as is; a URI's bytes, named by the URI for error messages."""
    if not is_uri(path):
        return Path(path)
    from pyarrow import fs as pafs
    filesystem, p = pafs.FileSystem.from_uri(path)
    with filesystem.open_input_file(p) as f:
        buf = io.BytesIO(f.read())
    buf.name = path
    return buf


class CaptionActor:
    """One per Ray worker: loads the model once, then captions rows {"paths": JSON list of one batch's paths}
    -> a row per photo {"path", "record" (JSON line or ""), "error" ("" or the one-line reason)}."""

    def __init__(self, model: str | None, beam: int, int8: bool, grounded: bool, backend: str, threads: int):
        from captioner.apps.api import Captioner
        # the encoder gets only this worker's cores: several workers on one node must not oversubscribe it
        self.captioner = Captioner.load(model, beam_size=beam, int8=int8, grounded=grounded, backend=backend,
                                        threads=threads)
        self.model_id = self.captioner.info["name"]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from captioner.data.images import ImageError
        paths = [p for b in batch["paths"] for p in json.loads(b)]
        sources, errors = [], {}
        for p in paths:
            try:
                sources.append(_source(p))
            except OSError as e:  # an unreadable remote object: reported like a bad image
                errors[p] = f"{p}: unreadable ({' '.join(str(e).split())})"
                sources.append(None)
        good = [i for i, s in enumerate(sources) if s is not None]
        results = dict(zip(good, self.captioner.caption_batch([sources[i] for i in good]))) if good else {}
        records, messages = [], []
        for i, p in enumerate(paths):
            r = results.get(i)
            if r is None or isinstance(r, ImageError):
                records.append("")
                messages.append(errors.get(p) or str(r))
                continue
            d = r.to_dict()
            records.append(json.dumps({"path": p} | {k: d[k] for k in RECORD_FIELDS[1:-1]} | {"model": self.model_id},
                                      ensure_ascii=False))
            messages.append("")
        return {"path": np.array(paths, dtype=object), "record": np.array(records, dtype=object),
                "error": np.array(messages, dtype=object)}


def caption_to_jsonl(paths: list, out: str | Path, *, address: str | None = None, workers: int = 2,
                     batch_size: int = 16, model: str | None = None, beam: int = 3, int8: bool = True,
                     grounded: bool = True, backend: str = "auto", num_cpus: int = 2, worker_cpus: int | None = None,
                     limit: int | None = None, progress: bool = True) -> dict:
    """Caption `paths` on Ray, appending to `out` one JSON line per photo not already there.

    `address` None starts a local Ray instance with `num_cpus` cores ("auto" or "HOST:PORT" attaches to a
    cluster); a Ray already initialised in this process is used as is and left running. Each of the `workers`
    actors reserves `worker_cpus` cores (None: num_cpus // workers locally, 1 on a cluster). `limit` captions at
    most that many of the remaining photos (a partial run). Returns {"written", "skipped", "failed", "todo"}.
    """
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'captioner[ray]'") from None
    out = Path(out)
    done = read_done(out)
    paths = list(dict.fromkeys(str(p) for p in paths))
    todo = [p for p in paths if p not in done][:limit]
    wanted = set(todo)
    # whole batches of the full list, as the single-process path makes them; written are only the wanted
    batches = [b for b in (paths[i:i + batch_size] for i in range(0, len(paths), batch_size))
               if any(p in wanted for p in b)]
    stats = {"written": 0, "skipped": len(set(paths) & done), "failed": 0, "todo": len(todo)}
    if not todo:
        return stats
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        # each worker's share of a local instance; on a cluster, 1-core workers (more of them, model each)
        cpus = worker_cpus or (max(1, num_cpus // workers) if not address else 1)
        # a block per batch (capped), so every worker gets some from the start and finished batches stream back
        ds = ray.data.from_items([{"paths": json.dumps(b)} for b in batches],
                                 override_num_blocks=min(len(batches), 64 * workers))
        ds = ds.map_batches(CaptionActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus,
                            batch_format="numpy",
                            fn_constructor_kwargs={"model": model, "beam": beam, "int8": int8,
                                                   "grounded": grounded, "backend": backend, "threads": cpus})
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for path, record, error in zip(batch["path"], batch["record"], batch["error"]):
                    if path not in wanted:  # written before, or past the limit
                        continue
                    if record:
                        f.write(record + "\n")
                        stats["written"] += 1
                    else:
                        print(f"error: {error}", file=sys.stderr)
                        stats["failed"] += 1
                f.flush()  # a kill loses only batches not yet back
    finally:
        if started:
            ray.shutdown()
    return stats
