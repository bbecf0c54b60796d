"""HTTP API and accessible web page around the Python API (`captioner.apps.api.Captioner`).

    POST /api/caption          multipart (field `file`) or raw image bytes -> caption JSON
    GET  /api/health           liveness; answers while the model is busy
    GET  /api/model            Captioner.info
    GET  /api/search?q=        photo-library search (only with a --db library)
    GET  /api/library/image    an image of that library (and nothing else)
    GET  /                     the page (static files shipped in the package; no CDN)

One worker thread owns the model: the event loop never runs inference, and requests that
queue up while the model is busy are captioned together in one `caption_batch` call
(micro-batching), which is where the throughput under concurrent load comes from.
"""
from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from captioner.features.encoder import ImageError, load_image

STATIC = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # room for the multipart envelope around a file of the maximum size
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class _ModelHolder:
    """Loads the Captioner once, on first use or at startup, whichever comes first."""

    def __init__(self, captioner=None, model_path=None):
        self._captioner = captioner
        self._model_path = model_path
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._captioner is not None

    def get(self):
        if self._captioner is None:
            with self._lock:
                if self._captioner is None:
                    from captioner.apps.api import Captioner
                    self._captioner = Captioner.load(self._model_path)
        return self._captioner


class _Batcher:
    """A single worker thread runs the model. Each turn it takes every request waiting in the
    queue (up to max_batch, lingering wait_ms for stragglers) and captions those that share
    options in one caption_batch call; max_batch=1 turns batching off."""

    def __init__(self, model: _ModelHolder, max_batch: int = 16, wait_ms: float = 0.0):
        self.model, self.max_batch, self.wait = model, max(1, max_batch), wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []  # recent batch sizes, for /api/health and the tests

    def submit(self, image, opts: tuple) -> Future:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="captioner-batcher", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((image, opts, fut))
        return fut

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=10)
                self._thread = None

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:  # closing: finish this batch first
                    self._queue.put(None)
                    break
                batch.append(item)
            groups = defaultdict(list)
            for image, opts, fut in batch:
                if fut.set_running_or_notify_cancel():  # False: the client has gone, skip its image
                    groups[opts].append((image, fut))
            for opts, items in groups.items():
                self._run(opts, items)
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-100:]

    def _run(self, opts: tuple, items: list) -> None:
        beam, n_best, attention = opts
        try:
            captioner = self.model.get()
            results = captioner.caption_batch([im for im, _ in items], beam_size=beam, n_best=n_best,
                                              attention=attention)
        except Exception as e:  # one item must not fail its neighbours: retry them one by one
            if len(items) == 1:
                items[0][1].set_exception(e)
                return
            for item in items:
                self._run(opts, [item])
            return
        for (_, fut), result in zip(items, results):
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


async def _read_limited(request: Request, max_bytes: int, slack: int = 0) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass `max_bytes` (+ `slack`):
    by its declared Content-Length before reading, else by counting while it streams in."""
    limit = max_bytes + slack
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"upload is {int(declared):,} bytes; the limit is {max_bytes:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload passed the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """(image bytes, a name for messages) from a multipart field `file` or a raw body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return await _read_limited(request, max_bytes), "upload"
    body = await _read_limited(request, max_bytes, MULTIPART_SLACK)

    async def once():
        yield body
    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise HTTPException(400, f"malformed multipart body: {e.message}") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise HTTPException(422, "no file: send the image in the multipart field 'file' or as the raw body")
    data = await file.read()
    await file.close()
    if len(data) > max_bytes:
        raise HTTPException(413, f"{file.filename or 'upload'} is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    return data, file.filename or "upload"


def _library_has(db: Path, path: str) -> bool:
    """Whether a library database lists `path`: any ordinary table with a `path` column counts,
    so this follows the library's schema without importing its internals."""
    con = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        tables = [name for name, sql in con.execute("SELECT name, sql FROM sqlite_master WHERE type='table'")
                  if sql and not sql.upper().startswith("CREATE VIRTUAL")]
        for table in tables:
            columns = {row[1] for row in con.execute(f'PRAGMA table_info("{table}")')}
            if "path" in columns and con.execute(f'SELECT 1 FROM "{table}" WHERE path = ? LIMIT 1',
                                                 (path,)).fetchone():
                return True
        return False
    finally:
        con.close()


def _check_db(db) -> Path | None:
    if db is not None and not Path(db).is_file():
        raise ValueError(f"{db}: no such library database (build it with `captioner index FOLDER --db {db}`)")
    return Path(db) if db is not None else None


def create_app(captioner=None, *, model_path=None, max_upload_mb: float = 10, db=None,
               max_batch: int = 16, batch_wait_ms: float = 0.0) -> FastAPI:
    """The web app. `captioner` (a loaded Captioner) wins over `model_path` (None = shipped model);
    `db` is an SQLite photo library built by `captioner index`, enabling /api/search."""
    db = _check_db(db)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    model = _ModelHolder(captioner, model_path)
    batcher = _Batcher(model, max_batch=max_batch, wait_ms=batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(model.get)  # load before the first request, not during it
        yield
        await run_in_threadpool(batcher.close)

    # no Swagger page: it loads its scripts from a CDN, and this app must work offline
    app = FastAPI(title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers["Content-Security-Policy"] = CSP
        return response

    @app.get("/api/health")
    async def health():
        return {"status": "ok", "model_loaded": model.loaded, "search": db is not None,
                "max_upload_bytes": max_bytes, "recent_batch_sizes": batcher.batch_sizes[-10:]}

    @app.get("/api/model")
    async def model_info():
        try:
            captioner = await run_in_threadpool(model.get)
        except (OSError, ValueError) as e:
            return _error(503, f"model not available: {e}")
        return captioner.info

    @app.post("/api/caption")
    async def caption(request: Request,
                      beam: int | None = Query(None, ge=1, le=10, description="beam size (default: the model's)"),
                      n_best: int = Query(1, ge=1, le=5, description="how many captions to return"),
                      attention: bool = Query(False, description="include per-word attention maps")):
        start = time.perf_counter()
        data, name = await _upload(request, max_bytes)
        if not data:
            return _error(422, f"{name}: empty upload (0 bytes)")
        if beam is not None and n_best > beam:
            return _error(422, f"n_best ({n_best}) cannot exceed beam ({beam})")
        try:
            # decode in the threadpool, in parallel with the model thread, and with the upload's own name
            image = await run_in_threadpool(load_image, data, name)
            result = await asyncio.wrap_future(batcher.submit(image, (beam, n_best, attention)))
        except ImageError as e:
            return _error(422, str(e))
        except (OSError, ValueError) as e:
            return _error(503, f"model not available: {e}")
        grid = list(model.get().info["grid"])
        out = {"caption": result.caption, "score": round(float(result.score), 4), "tokens": list(result.tokens),
               "alternatives": [{"caption": a["caption"], "score": round(float(a["score"]), 4)}
                                for a in result.alternatives],
               "grid": grid}
        if attention and result.attention is not None:
            out["attention"] = np.round(np.asarray(result.attention, dtype=np.float32), 4).tolist()
        out["ms"] = round((time.perf_counter() - start) * 1000, 1)
        return out

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=200), limit: int = Query(10, ge=1, le=50)):
        if db is None:
            return _error(404, "no photo library: start the server with --db LIBRARY.sqlite")
        from captioner.apps.library import search as library_search
        try:
            hits = library_search(db, q, limit=limit)
        except (sqlite3.Error, OSError, ValueError) as e:
            return _error(400, f"search {q!r}: {e}")
        return {"query": q, "results": [{**h, "path": str(h["path"])} for h in hits]}

    @app.get("/api/library/image")
    def library_image(path: str = Query(..., min_length=1)):
        if db is None:
            return _error(404, "no photo library: start the server with --db LIBRARY.sqlite")
        try:
            known = _library_has(db, path)
        except sqlite3.Error as e:
            return _error(500, f"{db}: cannot read the library ({e})")
        if not known:
            return _error(404, f"{path}: not in the library")
        if not Path(path).is_file():
            return _error(404, f"{path}: in the library but the file is gone")
        return FileResponse(path)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.batcher = batcher  # exposed for the tests and the load benchmark
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, model=None, max_upload_mb: float = 10, db=None,
          max_batch: int = 16) -> None:
    """Load the model (so a bad checkpoint fails here, in one line) and run the app under uvicorn."""
    import uvicorn

    from captioner.apps.api import Captioner
    _check_db(db)  # before the slow model load
    app = create_app(Captioner.load(model), max_upload_mb=max_upload_mb, db=db, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info")
