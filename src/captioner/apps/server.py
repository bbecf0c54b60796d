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

Hostile clients get bounded resources: uploads are capped (413), at most `decode_workers` images are
decoded at once and each is reduced to about the encoder's input as it is decoded, and past
`max_pending` requests or `max_pending_mb` of uploads in flight new captions get 503 with Retry-After.
A web page on another site cannot use the server: the Host header must name the server (loopback names,
IP literals, the bound host or --allow-host; DNS rebinding sends the attacker's name) and POSTs with an
Origin must come from the server's own origin. Responses never show host paths: library images are
named relative to their indexed folder and served only if their real path lies inside it.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import ipaddress
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from captioner.features.encoder import ImageError, load_image

STATIC = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # room for the multipart envelope around a file of the maximum size
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
RETRY_AFTER_S = 2  # what a shed request is told to wait
IDLE_TRIM_S = 2.0  # after this long without a caption request, freed memory goes back to the system
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _malloc_trim() -> None:
    """Return freed heap memory to the system. glibc keeps what decoding threads free in their malloc arenas,
    so after a burst of large images the server would otherwise hold hundreds of MB it no longer uses.
    A no-op where the C library has no malloc_trim."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    trim(0)


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
        trimmed = True
        while True:
            try:
                item = self._queue.get(timeout=IDLE_TRIM_S)
            except queue.Empty:
                if not trimmed:  # idle: give memory freed since the last batches back to the system
                    _malloc_trim()
                    trimmed = True
                continue
            trimmed = False
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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"upload passed the limit of {max_bytes:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to read the answer; just not a server error in the log
        raise HTTPException(400, f"upload aborted by the client after {size:,} bytes") from None
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


def _host_name(host_header: str) -> str:
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _host_allowed(host_header: str, allowed: set[str]) -> bool:
    """DNS rebinding points a name the attacker owns at this server, so the browser sends that name as
    Host. Loopback names, IP literals (a page served from an IP address is its own origin), the bound
    host and the --allow-host names are the server's own; "*" allows any."""
    host = _host_name(host_header)
    return bool(host) and ("*" in allowed or host in LOOPBACK_NAMES or host in allowed or _is_ip(host))


def _trusted_origin(origin: str, host_header: str, named: set[str]) -> bool:
    """The page's own origin, or one on a name given with --allow-host (a reverse proxy's public name)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and (parts.netloc.lower() == host_header.strip().lower()
                                                  or _host_name(parts.netloc) in named)


def _public_path(path: str, roots: list[Path]) -> str:
    """A library path as shown to clients: relative to its indexed folder, under that folder's name."""
    p = Path(path)
    for root in roots:
        if p.is_relative_to(root):
            return str(Path(root.name) / p.relative_to(root))
    return p.name


def _library_file(db: Path, path: str, roots: list[Path]) -> tuple[Path, Path] | None:
    """(file as stored, the indexed folder it is under) for a public or stored library path, else None."""
    p = Path(path)
    candidates = [p] if p.is_absolute() else [r / Path(*p.parts[1:]) for r in roots
                                                if len(p.parts) > 1 and p.parts[0] == r.name]
    for candidate in candidates:
        root = next((r for r in roots if candidate.is_relative_to(r)), None)
        if root is not None and ".." not in candidate.parts and _library_has(db, str(candidate)):
            return candidate, root
    return None


def _scrub_paths(info: dict) -> dict:
    """Model info without host paths: an absolute path is shown as its file name."""
    return {k: Path(v).name if isinstance(v, str) and os.path.isabs(v) else v for k, v in info.items()}


class _InFlight:
    """Caption requests being read, decoded, queued or run, and their upload bytes: beyond either bound new
    requests are shed with 503, so memory stays bounded however many clients send at once."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = self.bytes = 0

    def full(self, incoming_bytes: int) -> str | None:
        if self.requests >= self.max_requests:
            return f"server busy: {self.requests} captions in progress"
        if self.bytes and self.bytes + incoming_bytes > self.max_bytes:  # one upload alone always fits
            return f"server busy: {self.bytes / 2**20:.0f} MB of uploads in progress"
        return None


def _busy(message: str) -> JSONResponse:
    return JSONResponse({"detail": f"{message}; retry in {RETRY_AFTER_S} s"}, status_code=503,
                        headers={"Retry-After": str(RETRY_AFTER_S)})


def _check_db(db) -> Path | None:
    if db is not None and not Path(db).is_file():
        raise ValueError(f"{db}: no such library database (build it with `captioner index FOLDER --db {db}`)")
    return Path(db) if db is not None else None


def _model_unavailable(e: Exception):
    """503 without the reason's host paths (checkpoint errors name the file): the reason goes to the server log."""
    print(f"captioner serve: model not available: {e}", file=sys.stderr)
    return _error(503, "model not available (the server's log says why)")


def create_app(captioner=None, *, model_path=None, max_upload_mb: float = 10, db=None,
               max_batch: int = 16, batch_wait_ms: float = 0.0, host: str = "127.0.0.1",
               allow_hosts=(), max_pending: int = 64, max_pending_mb: float = 256,
               decode_workers: int = 2) -> FastAPI:
    """The web app. `captioner` (a loaded Captioner) wins over `model_path` (None = shipped model);
    `db` is an SQLite photo library built by `captioner index`, enabling /api/search. `host` is the bound
    address and `allow_hosts` more names clients may reach it by ("*": any). Past `max_pending` caption
    requests or `max_pending_mb` of their uploads new ones get 503; `decode_workers` images decode at once."""
    db = _check_db(db)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    model = _ModelHolder(captioner, model_path)
    batcher = _Batcher(model, max_batch=max_batch, wait_ms=batch_wait_ms)
    named = {h.strip().lower() for h in allow_hosts if h.strip()} - {"*"}
    allowed = {h.strip().lower() for h in allow_hosts if h.strip()} | {_host_name(host)}
    in_flight = _InFlight(max_pending, int(max_pending_mb * 1024 * 1024))
    # Decoding runs on its own few threads: each decode may briefly take a few hundred MB, and memory freed
    # by a thread stays in that thread's malloc arena, so fewer decoding threads also means less kept after.
    decoders = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="captioner-decode")

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(model.get)  # load before the first request, not during it
        yield
        await run_in_threadpool(batcher.close)
        decoders.shutdown(wait=False, cancel_futures=True)

    # no Swagger page: it loads its scripts from a CDN, and this app must work offline
    app = FastAPI(title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))

    @app.middleware("http")
    async def security_headers(request, call_next):
        host = request.headers.get("host", "")
        if not _host_allowed(host, allowed):
            return _error(421, f"Host {host[:100]!r} is not this server's name; start it with "
                               "--allow-host NAME to be reached by that name")
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None \
                and not _trusted_origin(origin, host, named):
            return _error(403, f"cross-origin {request.method} from {origin[:100]!r} refused")
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
            return _model_unavailable(e)
        return _scrub_paths(captioner.info)

    @app.post("/api/caption")
    async def caption(request: Request,
                      beam: int | None = Query(None, ge=1, le=10, description="beam size (default: the model's)"),
                      n_best: int = Query(1, ge=1, le=5, description="how many captions to return"),
                      attention: bool = Query(False, description="include per-word attention maps")):
        start = time.perf_counter()
        # reserve the upload's size before reading it (the most it may be, when it does not say)
        declared = request.headers.get("content-length", "")
        reserved = min(int(declared) if declared.isdigit() else max_bytes, max_bytes) + MULTIPART_SLACK
        busy = in_flight.full(reserved)
        if busy:
            return _busy(busy)
        in_flight.requests += 1
        in_flight.bytes += reserved
        try:
            data, name = await _upload(request, max_bytes)
            in_flight.bytes += len(data) - reserved  # what it really holds, until the request ends
            reserved = len(data)
            if not data:
                return _error(422, f"{name}: empty upload (0 bytes)")
            if beam is not None and n_best > beam:
                return _error(422, f"n_best ({n_best}) cannot exceed beam ({beam})")
            try:
                # decode in parallel with the model thread, with the upload's own name, a few at a time,
                # each reduced to about the encoder's input before it is queued
                image = await asyncio.get_running_loop().run_in_executor(decoders, load_image, data, name)
                del data
                result = await asyncio.wrap_future(batcher.submit(image, (beam, n_best, attention)))
            except ImageError as e:
                return _error(422, str(e))
            except (OSError, ValueError) as e:
                return _model_unavailable(e)
        finally:
            in_flight.requests -= 1
            in_flight.bytes -= reserved
        grid = list(model.get().info["grid"])
        out = {**result.to_dict(attention=attention), "grid": grid}
        out.pop("source", None)  # the upload's name, which the client already knows
        out["ms"] = round((time.perf_counter() - start) * 1000, 1)
        return out

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=200), limit: int = Query(10, ge=1, le=50)):
        if db is None:
            return _error(404, "no photo library: start the server with --db LIBRARY.sqlite")
        from captioner.apps.library import search as library_search
        from captioner.apps.library import library_roots
        try:
            hits = library_search(db, q, limit=limit)
            roots = library_roots(db)
        except (sqlite3.Error, OSError, ValueError) as e:
            return _error(400, f"search {q!r}: {str(e).replace(str(db), db.name)}")
        return {"query": q, "results": [{**h, "path": _public_path(h["path"], roots)} for h in hits]}

    @app.get("/api/library/image")
    def library_image(path: str = Query(..., min_length=1)):
        if db is None:
            return _error(404, "no photo library: start the server with --db LIBRARY.sqlite")
        from captioner.apps.library import library_roots
        try:
            found = _library_file(db, path, library_roots(db))
        except (sqlite3.Error, ValueError) as e:
            return _error(500, f"{db.name}: cannot read the library ({e})")
        if found is None:
            return _error(404, f"{path}: not in the library")
        file, root = found
        real = Path(os.path.realpath(file))
        # a symlink in an indexed folder must not serve what it points to outside the folder
        if not real.is_relative_to(os.path.realpath(root)):
            return _error(403, f"{path}: links outside the library's folder; not served")
        if not real.is_file():
            return _error(404, f"{path}: in the library but the file is gone")
        return FileResponse(real)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.batcher = batcher  # exposed for the tests and the load benchmark
    app.state.in_flight = in_flight
    return app


def serve(host: str = "127.0.0.1", port: int = 8000, model=None, max_upload_mb: float = 10, db=None,
          max_batch: int = 16, allow_hosts=()) -> None:
    """Load the model (so a bad checkpoint fails here, in one line) and run the app under uvicorn."""
    import uvicorn

    from captioner.apps.api import Captioner
    _check_db(db)  # before the slow model load
    app = create_app(Captioner.load(model), max_upload_mb=max_upload_mb, db=db, max_batch=max_batch,
                     host=host, allow_hosts=allow_hosts)
    uvicorn.run(app, host=host, port=port, log_level="info")
