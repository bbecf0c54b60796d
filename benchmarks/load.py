"""Load test of `captioner serve` on loopback: concurrent clients post Flickr8k photos with bad uploads mixed in.

    .venv/bin/python benchmarks/load.py                       # 1, 8 and 32 clients, micro-batching on
    .venv/bin/python benchmarks/load.py --max-batch 1         # the same with batching off, to compare
    .venv/bin/python benchmarks/load.py --clients 8 --requests 400 --seconds 20 --json load.json

Starts the server itself on a free port, runs each client count for a bounded number of requests and
seconds, and prints requests/s, captions/s, median and 99th-percentile latency of good uploads, error
counts (a good upload must get 200; every bad one must get a 4xx) and the server's RSS at start and end.
The numbers are only as quiet as the machine: the load average is printed so contention is visible.
"""
from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "flickr8k" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png_bomb(side=20000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def bad_uploads(jpeg: bytes, max_upload_mb: float) -> list[tuple[str, bytes]]:
    return [("empty.jpg", b""), ("notes.txt", b"not an image\n" * 50), ("cut.jpg", jpeg[: len(jpeg) // 3]),
            ("bomb.png", png_bomb()), ("big.jpg", os.urandom(int(max_upload_mb * 1024 * 1024) + 1024))]


def start_server(port: int, args) -> subprocess.Popen:
    return launch_server(port, ["--max-upload-mb", str(args.max_upload_mb), "--max-batch", str(args.max_batch)],
                         args.model)


def launch_server(port: int, options: list[str], model=None, log_path=None) -> subprocess.Popen:
    """`captioner serve` on 127.0.0.1:port with `options`, once /api/health answers (its output to log_path)."""
    command = [sys.executable, "-m", "captioner.apps.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *options, *(["--model", model] if model else [])]
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the server's, kept open
    proc = subprocess.Popen(command, stdout=log, stderr=log if log_path else subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = proc.stderr.read().decode()[-500:] if proc.stderr else f"see {log_path}"
            sys.exit(f"error: server exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("error: server did not answer within 120 s")


def run_level(url: str, clients: int, good: list[bytes], bad: list[tuple[str, bytes]], args) -> dict:
    """`clients` threads post until `requests` are done or `seconds` have passed; every `bad_every`-th is bad."""
    lock = threading.Lock()
    state = {"next": 0}
    records = []  # (is_good, status, seconds)
    stop_at = time.perf_counter() + args.seconds

    def client():
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop_at:
                with lock:
                    i = state["next"]
                    if i >= args.requests:
                        return
                    state["next"] += 1
                is_good = args.bad_every <= 0 or i % args.bad_every != args.bad_every - 1
                name, data = (f"{i}.jpg", good[i % len(good)]) if is_good else bad[(i // args.bad_every) % len(bad)]
                t = time.perf_counter()
                try:
                    status = http.post(f"{url}/api/caption", files={"file": (name, data, "image/jpeg")}).status_code
                except httpx.HTTPError:
                    status = -1  # connection dropped: an error whatever the upload was
                records.append((is_good, status, time.perf_counter() - t))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool, tqdm(total=args.requests, desc=f"{clients} clients", leave=False) as bar:
        futures = [pool.submit(client) for _ in range(clients)]
        while not all(f.done() for f in futures):
            time.sleep(0.2)
            bar.update(len(records) - bar.n)
        for f in futures:
            f.result()
    wall = time.perf_counter() - start
    good_lat = np.array([s for g, st, s in records if g and st == 200]) * 1000
    return {
        "clients": clients, "requests": len(records), "seconds": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 1),
        "captions_per_s": round(len(good_lat) / wall, 1),
        "p50_ms": round(float(np.median(good_lat)), 1) if len(good_lat) else None,
        "p99_ms": round(float(np.percentile(good_lat, 99)), 1) if len(good_lat) else None,
        "good_errors": sum(1 for g, st, _ in records if g and st != 200),
        "bad_sent": sum(1 for g, _, _ in records if not g),
        "bad_not_4xx": sum(1 for g, st, _ in records if not g and not 400 <= st < 500),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=300, help="requests per level (upper bound)")
    p.add_argument("--seconds", type=float, default=20, help="time per level (upper bound)")
    p.add_argument("--bad-every", type=int, default=10, help="every N-th upload is bad (0: none)")
    p.add_argument("--max-batch", type=int, default=16, help="server micro-batch size (1: off)")
    p.add_argument("--max-upload-mb", type=float, default=2)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--images", type=Path, default=IMAGES)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    paths = sorted(args.images.glob("*.jpg"))[:200]
    if not paths:
        sys.exit(f"error: {args.images}: no .jpg photos found")
    good = [path.read_bytes() for path in paths]
    bad = bad_uploads(good[0], args.max_upload_mb)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args)
    try:
        for data in good[:8]:  # warm-up: first calls pay for lazy initialisation
            httpx.post(f"{url}/api/caption", content=data, timeout=60)
        report = {"max_batch": args.max_batch, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
                  "rss_mb_start": round(rss_mb(proc.pid), 1), "levels": []}
        print(f"server pid {proc.pid}, max_batch={args.max_batch}, {os.cpu_count()} CPUs, "
              f"load average {report['load_avg_start']:.2f}, RSS {report['rss_mb_start']:.0f} MB")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'capt/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'good err':>8} {'bad sent':>8} {'bad !4xx':>8}")
        for clients in [int(c) for c in args.clients.split(",")]:
            r = run_level(url, clients, good, bad, args)
            report["levels"].append(r)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>7} {r['captions_per_s']:>7} "
                  f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['good_errors']:>8} {r['bad_sent']:>8} {r['bad_not_4xx']:>8}")
        batches = httpx.get(f"{url}/api/health").json().get("recent_batch_sizes", [])
        report.update(rss_mb_end=round(rss_mb(proc.pid), 1), load_avg_end=os.getloadavg()[0],
                      recent_batch_sizes=batches)
        print(f"server RSS {report['rss_mb_start']:.0f} MB -> {report['rss_mb_end']:.0f} MB; "
              f"recent batch sizes {batches}; load average now {report['load_avg_end']:.2f}")
    finally:
        proc.terminate()
        proc.wait(15)
    if args.json:
        from captioner.io import atomic_write_json
        atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
