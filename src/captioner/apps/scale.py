"""Caption a photo archive on a Ray cluster: `captioner caption DIR --ray [ADDRESS] --out results.jsonl`, and
the photos of `captioner index DIR --db library.sqlite --ray [ADDRESS]`.

Ray Data spreads the photos over an actor pool; each actor loads the Captioner once and captions whole
batches with `Captioner.caption_batch` (the one inference path). The batches are those `captioner caption
--batch-size N` makes (consecutive N of the path list, also on a rerun), so the file holds exactly the
single-process captions: the decoder's last digits depend slightly on the batch (1 caption of 200 differed
when Ray Data formed its own batches; benchmarks/ray_throughput.py).

The driver appends one JSON line per photo to the output as batches come back, so a killed job loses at most
the batches in flight: a rerun reads the file, drops a half-written last line and captions only the photos
it does not hold. Photos that cannot be read are reported on stderr and not written, so a rerun tries them
again.

`index --ray` (library.index_folder with `ray=`) sends the same actors the batches the single-process index
would caption, in library mode: each actor hashes and captions the bytes it reads and returns the whole result
(n-best alternatives included); the driver alone writes the SQLite rows, with the library's own `_store`, and
commits per batch as it comes back, so the library is the one a single process makes and a rerun resumes.

Paths are local files (on a cluster: a folder every node mounts at the same path) or URIs of any filesystem
pyarrow knows (s3://, gs://, hdfs://, file://), which the actors read themselves.

Needs the `[ray]` extra: pip install 'captioner[ray]'.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import closing
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
    -> a row per photo {"path", "record" (JSON line or ""), "error" ("" or the one-line reason)}.

    `library` True does what `library.index_folder` does with a batch in one process: each file's bytes are
    read, hashed and captioned with `n_best` alternatives, and the record is {"sha256", "model", "result"
    (CaptionResult.to_dict(), or null for an image that cannot be decoded)}; the driver writes the rows."""

    def __init__(self, model: str | None, beam: int, int8: bool, grounded: bool, backend: str, threads: int,
                 runtime: str = "auto", n_best: int = 1, library: bool = False):
        from captioner.apps.api import Captioner
        # the encoder gets only this worker's cores: several workers on one node must not oversubscribe it
        self.captioner = Captioner.load(model, runtime=runtime, beam_size=beam, int8=int8, grounded=grounded,
                                        backend=backend, threads=threads)
        self.model_id = self.captioner.info["name"]
        self.beam, self.n_best, self.library = beam, n_best, library

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        paths = [p for b in batch["paths"] for p in json.loads(b)]
        records, messages = self._library_rows(paths) if self.library else self._caption_rows(paths)
        return {"path": np.array(paths, dtype=object), "record": np.array(records, dtype=object),
                "error": np.array(messages, dtype=object)}

    def _caption_rows(self, paths: list[str]) -> tuple[list[str], list[str]]:
        """`captioner caption --out` records: RECORD_FIELDS of each photo."""
        from captioner.data.images import ImageError
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
        return records, messages

    def _library_rows(self, paths: list[str]) -> tuple[list[str], list[str]]:
        """Library records: the batch minus the unreadable files is one caption_batch of the bytes hashed, as
        in `library._Indexer.index` (the decoder's last digits depend on the batch)."""
        from captioner.apps.library import error_line
        data, errors = {}, {}
        for p in paths:
            try:
                data[p] = Path(p).read_bytes()
            except OSError as e:
                errors[p] = f"{p}: {e.strerror or e}"  # no record: stored without a hash, as in one process
        results = self.captioner.caption_batch(list(data.values()), beam_size=self.beam, n_best=self.n_best)
        records = {}
        for (p, content), r in zip(data.items(), results):
            failed = isinstance(r, Exception)
            if failed:
                errors[p] = error_line(p, r)
            records[p] = json.dumps({"sha256": hashlib.sha256(content).hexdigest(), "model": self.model_id,
                                     "result": None if failed else r.to_dict()}, ensure_ascii=False)
        return [records.get(p, "") for p in paths], [errors.get(p, "") for p in paths]


def require_ray():
    """The ray module, or a one-line RuntimeError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install 'captioner[ray]'") from None
    return ray


def _cause(error: Exception) -> str:
    """The last "SomeError: message" line of a Ray error's text (the worker's own exception), else its first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)]
    return raised[-1] if raised else lines[0]


def run_batches(batches: list[list[str]], *, address: str | None = None, workers: int = 2, num_cpus: int = 2,
                worker_cpus: int | None = None, progress: bool = True, **actor) -> Iterator[list[tuple]]:
    """Caption `batches` (lists of paths, each one `caption_batch` call) on a pool of `workers` CaptionActors;
    yields, as they come back, lists of (path, record, error) rows. `actor`: CaptionActor's model options
    (model, beam, int8, grounded, backend, runtime, n_best, library). Use it in `contextlib.closing`, so an
    error in the consumer shuts down the Ray instance this started.

    `address` None starts a local Ray instance with `num_cpus` cores ("auto" or "HOST:PORT" attaches to a
    cluster); a Ray already initialised in this process is used as is and left running. Each actor reserves
    `worker_cpus` cores (None: num_cpus // workers locally, 1 on a cluster)."""
    ray = require_ray()
    if not batches:
        return
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": num_cpus}
        ray.init(**kwargs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        # each worker's share of a local instance; on a cluster, 1-core workers (more of them, model each)
        cpus = worker_cpus or (max(1, num_cpus // workers) if not address else 1)
        # a block per batch (capped), so every worker gets some from the start and finished batches stream back
        ds = ray.data.from_items([{"paths": json.dumps(b)} for b in batches],
                                 override_num_blocks=min(len(batches), 64 * workers))
        ds = ds.map_batches(CaptionActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cpus, batch_format="numpy",
                            fn_constructor_kwargs={"model": None, "beam": 3, "int8": True, "grounded": True,
                                                   "backend": "auto"} | actor | {"threads": cpus})
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                yield list(zip(batch["path"], batch["record"], batch["error"]))
        except ray.exceptions.RayError as e:  # e.g. a worker could not load the model: its error, in one line
            raise RuntimeError(f"Ray job failed: {_cause(e)}") from None
    finally:
        if started:
            ray.shutdown()


def caption_to_jsonl(paths: list, out: str | Path, *, address: str | None = None, workers: int = 2,
                     batch_size: int = 16, model: str | None = None, beam: int = 3, int8: bool = True,
                     grounded: bool = True, backend: str = "auto", num_cpus: int = 2, worker_cpus: int | None = None,
                     limit: int | None = None, progress: bool = True) -> dict:
    """Caption `paths` on Ray (`run_batches`: `address`, `workers`, `num_cpus`, `worker_cpus` are its own),
    appending to `out` one JSON line per photo not already there. `limit` captions at most that many of the
    remaining photos (a partial run). Returns {"written", "skipped", "failed", "todo"}.
    """
    require_ray()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = run_batches(batches, address=address, workers=workers, num_cpus=num_cpus, worker_cpus=worker_cpus,
                       progress=progress, model=model, beam=beam, int8=int8, grounded=grounded, backend=backend)
    with closing(rows), open(out, "a", encoding="utf-8") as f:
        for batch in rows:
            for path, record, error in batch:
                if path not in wanted:  # written before, or past the limit
                    continue
                if record:
                    f.write(record + "\n")
                    stats["written"] += 1
                else:
                    print(f"error: {error}", file=sys.stderr)
                    stats["failed"] += 1
            f.flush()  # a kill loses only batches not yet back
    return stats
