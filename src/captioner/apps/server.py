"""HTTP API and accessible web page around the Python API (`captioner.apps.api.Captioner`).

    POST /api/caption          multipart (field `file`) or raw image bytes -> caption JSON
    POST /api/caption/batch    multipart, several `files` -> a list: one caption or {"error"} per file
    GET  /api/health           liveness; answers while the model is busy
    GET  /api/model            Captioner.info, without host paths
    GET  /api/search?q=        library search: photos, and video scenes with start/end (only with a --db library)
    GET  /api/library/image    an image or video of that library (and nothing else; byte ranges for seeking)
    WS   /api/live             live mode: JPEG frames in (binary messages), caption JSON out, newest frame wins
    POST /api/video            a video (multipart `file` or raw) -> one description per scene, and WebVTT
    GET  /api/openapi.json     the schema; /docs shows it as interactive docs (Swagger UI served from here)
    GET  /                     the page (static files shipped in the package; no CDN)

One worker thread owns the model: the event loop never runs inference, and requests that
queue up while the model is busy are captioned together in one `caption_batch` call
(micro-batching), which is where the throughput under concurrent load comes from.

Hostile clients get bounded resources: uploads are capped (413), at most `decode_workers` images are
decoded at once and each is reduced to about the encoder's input as it is decoded, and past
`max_pending` requests or `max_pending_mb` of uploads in flight new captions get 503 with Retry-After.
A web page on another site cannot use the server: the Host header must name the server (loopback names,
IP literals, the bound host or --allow-host; DNS rebinding sends the attacker's name) and POSTs and
WebSockets with an Origin must come from the server's own origin or one given with --cors-origin (browsers
let any page open a WebSocket to any server: this check keeps other sites off /api/live). Responses never
show host paths: library images are named relative to their indexed folder and served only if their real
path lies inside it.
"""
from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import hashlib
import io
import ipaddress
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.websockets import WebSocketDisconnect

from captioner.apps import schema
from captioner.data.images import ImageError, load_image

STATIC = Path(__file__).parent / "static"
MULTIPART_SLACK = 64 * 1024  # room for the multipart envelope around a file of the maximum size
MAX_BATCH_FILES = 32  # files in one /api/caption/batch request
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
RETRY_AFTER_S = 2  # what a shed request is told to wait
IDLE_TRIM_S = 2.0  # after this long without a caption request, freed memory goes back to the system
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# /docs: Swagger UI's files, from the swagger-ui-bundle package; only these are served
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}


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


# --- reading uploads -------------------------------------------------------------------------------

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


async def _multipart(request: Request, body: bytes, max_files: int) -> dict:
    """The form of a multipart body already read in full (so its size was checked while it streamed)."""
    async def once():
        yield body
    try:
        return await MultiPartParser(request.headers, once(), max_files=max_files, max_fields=8).parse()
    except MultiPartException as e:
        if max_files > 1 and e.message.startswith("Too many files"):  # a batch past its bound
            raise HTTPException(413, f"more than {max_files} files in one request") from None
        raise HTTPException(400, f"malformed multipart body: {e.message}") from None


async def _upload(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """(image bytes, a name for messages) from a multipart field `file` or a raw body."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return await _read_limited(request, max_bytes), "upload"
    form = await _multipart(request, await _read_limited(request, max_bytes, MULTIPART_SLACK), max_files=1)
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise HTTPException(422, "no file: send the image in the multipart field 'file' or as the raw body")
    data = await file.read()
    await file.close()
    if len(data) > max_bytes:
        raise HTTPException(413, f"{file.filename or 'upload'} is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    return data, file.filename or "upload"


async def _uploads(request: Request, max_total: int) -> list[tuple[bytes, str]]:
    """[(bytes, name)] of the multipart fields `files`, in order; the body may hold at most `max_total` bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(422, "send the images as multipart/form-data, each in a field named 'files'")
    form = await _multipart(request, await _read_limited(request, max_total, MULTIPART_SLACK), MAX_BATCH_FILES)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(422, "no files: send the images in multipart fields named 'files'")
    out = []
    for number, file in enumerate(files, 1):
        out.append((await file.read(), file.filename or f"file {number}"))
        await file.close()
    return out


def _declared_size(request: Request, max_bytes: int) -> int:
    """What an upload may hold, known before reading it: its Content-Length, else the most it may be."""
    declared = request.headers.get("content-length", "")
    return min(int(declared) if declared.isdigit() else max_bytes, max_bytes) + MULTIPART_SLACK


# --- admission: bounded work in flight -------------------------------------------------------------

class _Busy(HTTPException):
    """503 with Retry-After: the server is at one of its in-flight bounds."""

    def __init__(self, reason: str):
        super().__init__(503, f"{reason}; retry in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.reason = reason


class _Hold:
    """The bytes one admitted request holds: first what it may hold, then (`resize`) what it really holds."""

    def __init__(self, in_flight: _InFlight, nbytes: int):
        self.in_flight, self.bytes = in_flight, nbytes

    def resize(self, nbytes: int) -> None:
        self.in_flight.bytes += nbytes - self.bytes
        self.bytes = nbytes


class _InFlight:
    """Caption requests being read, decoded, queued or run, and their upload bytes: beyond either bound new
    requests are shed with 503, so memory stays bounded however many clients send at once. Every route that
    reads an upload goes through `admit`."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.requests = self.bytes = 0

    def full(self, incoming_bytes: int) -> str | None:
        if self.requests >= self.max_requests:
            return f"server busy: {self.requests} captions in progress"
        if self.bytes and self.bytes + incoming_bytes > self.max_bytes:  # one upload alone always fits
            return f"server busy: {self.bytes / 2**20:.0f} MB of uploads in progress"
        return None

    @contextmanager
    def admit(self, nbytes: int):
        """Count one request holding `nbytes` while the block runs, or raise _Busy. No await between the check
        and the count: the event loop's one thread makes this atomic."""
        if busy := self.full(nbytes):
            raise _Busy(busy)
        self.requests += 1
        self.bytes += nbytes
        hold = _Hold(self, nbytes)
        try:
            yield hold
        finally:
            self.requests -= 1
            self.bytes -= hold.bytes


# --- who may use the server ------------------------------------------------------------------------

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


class _Guard:
    """The Host and Origin checks for requests and WebSockets: answers None (let it in) or (status, reason)."""

    def __init__(self, host: str, allow_hosts, cors_origins):
        names = {h.strip().lower() for h in allow_hosts if h.strip()}
        self.allowed = names | {_host_name(host)}  # "*" stays in: any Host
        self.named = names - {"*"}
        self.cors = set(cors_origins)

    def refuse(self, host: str, origin: str | None, what: str) -> tuple[int, str] | None:
        """`what` names the request in the message ("POST", "WebSocket"); `origin` None: not cross-origin."""
        if not _host_allowed(host, self.allowed):
            return 421, (f"Host {host[:100]!r} is not this server's name; start it with "
                         "--allow-host NAME to be reached by that name")
        if origin is not None and not ("*" in self.cors or origin in self.cors
                                       or _trusted_origin(origin, host, self.named)):
            return 403, f"cross-origin {what} from {origin[:100]!r} refused"
        return None


def _cors_origin(origin: str) -> str:
    """An origin as browsers send it ('https://example.com:8443'), or "*"; anything else is a ValueError."""
    if origin == "*":
        return origin
    parts = urlsplit(origin.strip().rstrip("/"))
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ValueError(f"--cors-origin {origin!r}: give an origin such as https://example.com (no path)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with the HTTP status and JSON body a POST would get (where the server
    supports denial responses; else a plain 403 from closing before accepting)."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(_error(status, message))
    else:
        await ws.close(code=1008, reason=message[:120])


# --- the photo library -----------------------------------------------------------------------------

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


# --- the routes ------------------------------------------------------------------------------------

class _ViaBatcher:
    """The captioner `describe_video` sees on the server: a video's scene frames queue with everyone's photos
    and live frames, so the one model thread micro-batches them all."""

    def __init__(self, batcher: _Batcher, beam: int | None):
        self.batcher, self.beam = batcher, beam

    def caption_batch(self, images: list) -> list:
        futures = [self.batcher.submit(image, (self.beam, 1, False)) for image in images]
        return [f.exception() or f.result() for f in futures]  # an unreadable frame: its error, in its place


def _check_db(db) -> Path | None:
    if db is not None and not Path(db).is_file():
        raise ValueError(f"{db}: no such library database (build it with `captioner index FOLDER --db {db}`)")
    return Path(db) if db is not None else None


def _model_unavailable(e: Exception):
    """503 without the reason's host paths (checkpoint errors name the file): the reason goes to the server log."""
    print(f"captioner serve: model not available: {e}", file=sys.stderr)
    return _error(503, "model not available (the server's log says why)")


class _Service:
    """What the routes share: the model and its worker thread, the decoding threads, the bounds on work in
    flight, the upload limits and the photo library."""

    def __init__(self, captioner, model_path, db, *, max_upload_mb, max_video_mb, max_batch, batch_wait_ms,
                 max_pending, max_pending_mb, decode_workers):
        self.db = _check_db(db)
        self.max_bytes = int(max_upload_mb * 1024 * 1024)
        self.max_video_bytes = int(max_video_mb * 1024 * 1024)
        self.model = _ModelHolder(captioner, model_path)
        self.batcher = _Batcher(self.model, max_batch=max_batch, wait_ms=batch_wait_ms)
        self.in_flight = _InFlight(max_pending, int(max_pending_mb * 1024 * 1024))
        # a batch's body: its files at the upload limit each, but never more than all uploads in flight may hold
        self.max_batch_bytes = min(MAX_BATCH_FILES * self.max_bytes, self.in_flight.max_bytes)
        # Decoding runs on its own few threads: each decode may briefly take a few hundred MB, and memory freed
        # by a thread stays in that thread's malloc arena, so fewer decoding threads also means less kept after.
        self.decoders = ThreadPoolExecutor(max(1, decode_workers), thread_name_prefix="captioner-decode")

    @asynccontextmanager
    async def lifespan(self, app):
        await run_in_threadpool(self.model.get)  # load before the first request, not during it
        yield
        await run_in_threadpool(self.batcher.close)
        self.decoders.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes, name: str):
        """Decode in parallel with the model thread, with the upload's own name, a few at a time, each reduced
        to about the encoder's input; an ImageError names what is wrong."""
        return await asyncio.get_running_loop().run_in_executor(self.decoders, load_image, data, name)

    async def caption(self, image, opts: tuple):
        """(beam, n_best, attention) -> CaptionResult: queued for the model thread with everyone's images."""
        return await asyncio.wrap_future(self.batcher.submit(image, opts))

    def grid(self) -> list[int]:
        return list(self.model.get().info["grid"])


def _caption_options(beam: int | None = Query(None, ge=1, le=10, description="beam size (default: the model's)"),
                     n_best: int = Query(1, ge=1, le=5, description="how many captions to return"),
                     attention: bool = Query(False, description="include per-word attention maps")) -> tuple:
    return beam, n_best, attention


def _bad_options(opts: tuple) -> JSONResponse | None:
    beam, n_best, _ = opts
    if beam is not None and n_best > beam:
        return _error(422, f"n_best ({n_best}) cannot exceed beam ({beam})")
    return None


def _add_info_routes(app: FastAPI, s: _Service) -> None:
    @app.get("/api/health")
    async def health():
        return {"status": "ok", "model_loaded": s.model.loaded, "search": s.db is not None,
                "max_upload_bytes": s.max_bytes, "recent_batch_sizes": s.batcher.batch_sizes[-10:]}

    @app.get("/api/model", responses=schema.refusals(503))
    async def model_info():
        try:
            captioner = await run_in_threadpool(s.model.get)
        except (OSError, ValueError) as e:
            return _model_unavailable(e)
        return _scrub_paths(captioner.info)


def _add_caption_routes(app: FastAPI, s: _Service) -> None:
    @app.post("/api/caption", response_model=None, openapi_extra=schema.upload_body("file", "an image"),
              responses={200: {"model": schema.Caption}, **schema.refusals(400, 403, 413, 421, 422, 503)})
    async def caption(request: Request, opts: tuple = Depends(_caption_options)):
        start = time.perf_counter()
        with s.in_flight.admit(_declared_size(request, s.max_bytes)) as hold:
            data, name = await _upload(request, s.max_bytes)
            hold.resize(len(data))  # what it really holds, until the request ends
            if not data:
                return _error(422, f"{name}: empty upload (0 bytes)")
            if bad := _bad_options(opts):
                return bad
            try:
                image = await s.decode(data, name)
                del data
                result = await s.caption(image, opts)
            except ImageError as e:
                return _error(422, str(e))
            except (OSError, ValueError) as e:
                return _model_unavailable(e)
        out = {**result.to_dict(attention=opts[2]), "grid": s.grid()}
        out.pop("source", None)  # the upload's name, which the client already knows
        out["ms"] = round((time.perf_counter() - start) * 1000, 1)
        return out

    @app.post("/api/caption/batch", response_model=None,
              openapi_extra=schema.upload_body("files", f"up to {MAX_BATCH_FILES} images", many=True),
              responses={200: {"model": list[schema.Caption | schema.ItemError]},
                         **schema.refusals(400, 403, 413, 421, 422, 503)})
    async def caption_batch(request: Request, opts: tuple = Depends(_caption_options)):
        """Several images -> one entry per file, in order: its caption (the fields of /api/caption, with
        `source`, the file's name) or {"error": "NAME: problem"}; one bad file does not fail the others. The
        files queue with everyone's images, so the model thread batches them with the rest of the traffic."""
        with s.in_flight.admit(_declared_size(request, s.max_batch_bytes)) as hold:
            files = await _uploads(request, s.max_batch_bytes)
            hold.resize(sum(len(data) for data, _ in files))
            if bad := _bad_options(opts):
                return bad
            decoded = await asyncio.gather(*(_decode_item(s, data, name) for data, name in files))
            del files
            try:
                results = await asyncio.gather(*(_caption_item(s, item, opts) for item in decoded))
            except (OSError, ValueError) as e:
                return _model_unavailable(e)
        grid = s.grid()
        return [{**r["result"].to_dict(attention=opts[2]), "grid": grid, "source": r["source"]}
                if "result" in r else r for r in results]


async def _decode_item(s: _Service, data: bytes, name: str) -> dict:
    """One file of a batch -> {"image", "source"} or {"error"}."""
    if not data:
        return {"error": f"{name}: empty upload (0 bytes)"}
    if len(data) > s.max_bytes:
        return {"error": f"{name}: {len(data):,} bytes; the limit is {s.max_bytes:,} bytes"}
    try:
        return {"image": await s.decode(data, name), "source": name}
    except ImageError as e:
        return {"error": str(e)}


async def _caption_item(s: _Service, item: dict, opts: tuple) -> dict:
    """{"image", "source"} -> {"result", "source"}, or {"error"} for an image the model could not caption;
    raises what /api/caption answers 503 for (the model not available)."""
    if "error" in item:
        return item
    try:
        return {"result": await s.caption(item["image"], opts), "source": item["source"]}
    except ImageError as e:
        return {"error": str(e)}


def _add_video_route(app: FastAPI, s: _Service) -> None:
    @app.post("/api/video", openapi_extra=schema.upload_body("file", "a video"), response_model=None,
              responses={200: {"model": schema.Video}, **schema.refusals(400, 403, 413, 421, 422, 503)})
    async def video(request: Request, beam: int | None = Query(None, ge=1, le=10)):
        """A video -> {cues: [{start, end, text, caption, confidence, tags}], vtt, error}: `error` names the damage
        of a video described up to it (its cues are kept); a video with nothing readable gets 422."""
        from captioner.apps.video import VideoError, describe_video, to_vtt
        start = time.perf_counter()
        with s.in_flight.admit(_declared_size(request, s.max_video_bytes)):
            data, name = await _upload(request, s.max_video_bytes)
            if not data:
                return _error(422, f"{name}: empty upload (0 bytes)")
            buf = io.BytesIO(data)
            buf.name = name  # what messages call it (never a host path)
            error = None
            try:
                cues = await run_in_threadpool(describe_video, _ViaBatcher(s.batcher, beam), buf)
            except VideoError as e:
                cues, error = e.cues, str(e)
            except (OSError, ValueError) as e:
                return _model_unavailable(e)
            if error and not cues:
                return _error(422, error)
        return {"cues": [c.to_dict() for c in cues], "vtt": to_vtt(cues), "error": error,
                "ms": round((time.perf_counter() - start) * 1000, 1)}


def _add_live_route(app: FastAPI, s: _Service, guard: _Guard) -> None:
    @app.websocket("/api/live")
    async def live(ws: WebSocket, beam: int | None = Query(None, ge=1, le=10)):
        """Binary messages are JPEG (or any image) frames; each answer is one JSON text message for the newest
        frame: {frame, text, caption, confidence, concepts, score, ms, dropped} or {frame, error}. Frames that
        arrive while one is being captioned replace each other (the newest wins, `dropped` counts the others),
        so a client sending faster than the server captions never builds a queue."""
        if refused := guard.refuse(ws.headers.get("host", ""), ws.headers.get("origin"), "WebSocket"):
            return await _deny(ws, *refused)
        await ws.accept()
        newest: list = []  # [(frame number, bytes, arrival time)]: at most one frame waits
        arrived = asyncio.Event()
        counts = {"received": 0, "dropped": 0}

        async def read():
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is None:
                    continue  # text messages are not frames
                counts["received"] += 1
                counts["dropped"] += len(newest)
                newest[:] = [(counts["received"], message["bytes"], time.perf_counter())]
                arrived.set()

        reader = asyncio.create_task(read())
        try:
            while True:
                waiting = asyncio.ensure_future(arrived.wait())
                await asyncio.wait({reader, waiting}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    break  # the client has gone
                arrived.clear()
                number, data, t_in = newest.pop()
                reply = await _live_frame(s, data, number, beam)
                del data
                await ws.send_json({"frame": number, **reply, "dropped": counts["dropped"],
                                    "ms": round((time.perf_counter() - t_in) * 1000, 1)})
        except (WebSocketDisconnect, RuntimeError):  # closed while answering
            pass
        finally:
            reader.cancel()
            if reader.done() and not reader.cancelled():
                reader.exception()  # a receive after the socket closed: retrieved, so not logged as unhandled


async def _live_frame(s: _Service, data: bytes, number: int, beam: int | None) -> dict:
    """One live frame -> the fields the page needs, or {"error"}; admitted and batched as uploads are."""
    name = f"frame {number}"
    if not data:
        return {"error": f"{name}: empty (0 bytes)"}
    if len(data) > s.max_bytes:
        return {"error": f"{name} is {len(data):,} bytes; the limit is {s.max_bytes:,} bytes"}
    try:
        with s.in_flight.admit(len(data)):
            result = await s.caption(await s.decode(data, name), (beam, 1, False))
    except _Busy as e:
        return {"error": f"{e.reason}; frame skipped", "retry_ms": RETRY_AFTER_S * 1000}
    except ImageError as e:
        return {"error": str(e)}
    except (OSError, ValueError) as e:
        print(f"captioner serve: model not available: {e}", file=sys.stderr)
        return {"error": "model not available (the server's log says why)"}
    wanted = ("text", "caption", "confidence", "concepts", "score")
    return {k: v for k, v in result.to_dict().items() if k in wanted}


def _add_library_routes(app: FastAPI, s: _Service) -> None:
    no_library = "no photo library: start the server with --db LIBRARY.sqlite"

    @app.get("/api/search", responses=schema.refusals(400, 404))
    def search(q: str = Query(..., min_length=1, max_length=200), limit: int = Query(10, ge=1, le=50)):
        """The library's photos and video scenes that best match the words of `q`, best first; a video
        scene's result also has `start` and `end` (seconds), for `/api/library/image?path=...#t=start,end`."""
        if s.db is None:
            return _error(404, no_library)
        from captioner.apps.library import library_roots
        from captioner.apps.library import search as library_search
        try:
            hits = library_search(s.db, q, limit=limit)
            roots = library_roots(s.db)
        except (sqlite3.Error, OSError, ValueError) as e:
            return _error(400, f"search {q!r}: {str(e).replace(str(s.db), s.db.name)}")
        return {"query": q, "results": [{**h, "path": _public_path(h["path"], roots)} for h in hits]}

    @app.get("/api/library/image", responses=schema.refusals(403, 404))
    def library_image(path: str = Query(..., min_length=1)):
        if s.db is None:
            return _error(404, no_library)
        from captioner.apps.library import library_roots
        try:
            found = _library_file(s.db, path, library_roots(s.db))
        except (sqlite3.Error, ValueError) as e:
            return _error(500, f"{s.db.name}: cannot read the library ({e})")
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


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_docs_routes(app: FastAPI) -> None:
    """/docs: Swagger UI on the schema, every file of it served from here (the page works offline)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from swagger_ui_bundle import swagger_ui_path

    page = get_swagger_ui_html(openapi_url="/docs/openapi-3.0.json", title="captioner API",
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon-32x32.png",
                               swagger_ui_parameters={"validatorUrl": None})  # no online validator badge
    html = page.body.decode()
    # the page starts Swagger UI with one inline script: allowed by its hash, every other script still refused
    inline = html.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    csp = f"{CSP}; script-src 'self' 'sha256-{digest}'"

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})

    @app.get("/docs/openapi-3.0.json", include_in_schema=False)
    async def docs_schema():
        return _openapi_30(app.openapi())

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str):
        if name not in DOCS_ASSETS:
            return _error(404, f"{name}: no such file")
        return FileResponse(Path(swagger_ui_path) / name, media_type=DOCS_ASSETS[name])


def _openapi_30(spec: dict) -> dict:
    """The schema as OpenAPI 3.0 for Swagger UI 4 (the one the swagger-ui-bundle package ships), which refuses
    3.1: a type-or-null `anyOf` becomes `nullable`, `examples` (a 3.1 list) the first `example`."""
    def down(node):
        if isinstance(node, list):
            return [down(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: down(v) for k, v in node.items()}
        options = node.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            node.pop("anyOf")
            node.update(rest[0] if len(rest) == 1 else {"anyOf": rest}, nullable=True)
        if isinstance(node.get("examples"), list) and "type" in node:  # a schema's examples, not a media type's
            node["example"] = node.pop("examples")[0]
        return node
    return {**down(spec), "openapi": "3.0.3"}


def _add_guards(app: FastAPI, guard: _Guard) -> None:
    """Host and Origin checks on every request, the security headers on every answer, and CORS headers for
    the --cors-origin origins (none without it). The guard runs first: a refused request reaches nothing."""
    if guard.cors:
        app.add_middleware(CORSMiddleware, allow_origins=sorted(guard.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"], expose_headers=["Retry-After"], max_age=600)

    @app.middleware("http")  # added last, so it runs outermost
    async def security_headers(request, call_next):
        # reading is harmless (browsers keep other sites from reading the answer); sending is checked
        sends = request.method not in ("GET", "HEAD", "OPTIONS")
        origin = request.headers.get("origin") if sends else None
        if refused := guard.refuse(request.headers.get("host", ""), origin, request.method):
            return _error(*refused)
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if response.headers.get("content-type", "").startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", CSP)  # /docs sets its own
        return response


def _add_one_line_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request, exc):
        parts = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts))


def create_app(captioner=None, *, model_path=None, max_upload_mb: float = 10, db=None,
               max_batch: int = 16, batch_wait_ms: float = 0.0, host: str = "127.0.0.1",
               allow_hosts=(), max_pending: int = 64, max_pending_mb: float = 256,
               decode_workers: int = 2, max_video_mb: float = 100, cors_origins=()) -> FastAPI:
    """The web app. `captioner` (a loaded Captioner) wins over `model_path` (None = shipped model);
    `db` is an SQLite photo library built by `captioner index`, enabling /api/search. `host` is the bound
    address and `allow_hosts` more names clients may reach it by ("*": any). `cors_origins` are other sites'
    origins whose pages may call the API ("*": any). Past `max_pending` caption requests or `max_pending_mb`
    of their uploads new ones get 503; `decode_workers` images decode at once; videos may be up to
    `max_video_mb`."""
    guard = _Guard(host, allow_hosts, [_cors_origin(o) for o in cors_origins])
    s = _Service(captioner, model_path, db, max_upload_mb=max_upload_mb, max_video_mb=max_video_mb,
                 max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_pending=max_pending,
                 max_pending_mb=max_pending_mb, decode_workers=decode_workers)
    # FastAPI's own /docs would load Swagger UI from a CDN; ours serves it from here
    app = FastAPI(title="captioner", lifespan=s.lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    _add_guards(app, guard)
    _add_one_line_errors(app)
    _add_info_routes(app, s)
    _add_caption_routes(app, s)
    _add_live_route(app, s, guard)
    _add_video_route(app, s)
    _add_library_routes(app, s)
    _add_docs_routes(app)
    _add_page_routes(app)
    app.state.batcher = s.batcher  # exposed for the tests and the load benchmark
    app.state.in_flight = s.in_flight
    return app


def exposure_warning(host: str) -> str | None:
    """A one-line warning when `host` lets other machines reach the server (anything but loopback)."""
    name = host.strip("[]")
    if name == "localhost":
        return None
    try:
        if ipaddress.ip_address(name).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to anything
        pass
    return (f"warning: listening on {host}: other machines can reach this server and caption with it; it has no "
            "authentication (bind 127.0.0.1 and put a proxy with access control in front)")


def serve(host: str = "127.0.0.1", port: int = 8000, model=None, max_upload_mb: float = 10, db=None,
          max_batch: int = 16, allow_hosts=(), cors_origins=()) -> None:
    """Load the model (so a bad checkpoint fails here, in one line) and run the app under uvicorn."""
    import uvicorn

    from captioner.apps.api import Captioner
    _check_db(db)  # before the slow model load, as are the origins
    cors_origins = [_cors_origin(o) for o in cors_origins]
    if warning := exposure_warning(host):
        print(warning, file=sys.stderr, flush=True)
    app = create_app(Captioner.load(model), max_upload_mb=max_upload_mb, db=db, max_batch=max_batch,
                     host=host, allow_hosts=allow_hosts, cors_origins=cors_origins)
    uvicorn.run(app, host=host, port=port, log_level="info")
