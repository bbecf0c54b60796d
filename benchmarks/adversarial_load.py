"""Adversarial load on `captioner serve` (loopback only): many clients upload good photos mixed with bombs,
declared-huge GIFs/PNGs, truncated and non-image files, oversized, slow and aborted uploads.

    .venv/bin/python benchmarks/adversarial_load.py                        # 32 clients, 60 s, then 30 s idle
    .venv/bin/python benchmarks/adversarial_load.py --clients 8 --seconds 10 --after 5   # a quick look

Starts the server itself on a free port of 127.0.0.1, samples its RSS (VmRSS of the process) every 0.1 s
during the load and the `--after` seconds that follow, and prints per kind of upload the status codes it
got. What it checks: no 5xx except the 503 of load shedding (counted apart), every bad upload a 4xx whose
message names the problem, good photos 200 with their p50/p99 latency, peak RSS and RSS after the load.
Results go to benchmarks/results/adversarial_load.json (--json to change). The numbers are only as quiet
as the machine: the load average is recorded.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from load import free_port, launch_server, rss_mb  # benchmarks/load.py: the plain load test's helpers

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "flickr8k" / "images"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(side: int, bit_depth: int = 1, colour: int = 0, data: bytes = b"\0" * 4096) -> bytes:
    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b"")


def gif_canvas(side: int = 7900) -> bytes:
    """~35 bytes: a 1x1 frame on a side x side logical screen."""
    return (b"GIF89a" + struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
            + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00;")


def uploads(good: list[bytes], max_upload_mb: float) -> dict[str, tuple[list[bytes], str]]:
    """kind -> (bodies, the words a 4xx must contain; "" for uploads that must be captioned)."""
    # a valid 64-megapixel 1-bit PNG of a few kB: within every limit, the heaviest honest decode there is
    buf = io.BytesIO()
    Image.new("1", (7999, 7999)).save(buf, "PNG")
    return {
        "good photo": (good, ""),
        "valid 64 MP PNG": ([buf.getvalue()], ""),
        "PNG bomb (400 MP declared)": ([png_declaring(20000)], "too many pixels"),
        "GIF declaring 7900x7900 (35 bytes)": ([gif_canvas()], "decompression bomb"),
        "PNG declaring 7900x7900 (tiny data)": ([png_declaring(7900, 8, 2)], "decompression bomb"),
        "truncated JPEG": ([g[: len(g) // 3] for g in good[:20]], "truncated or corrupt"),
        "text file": ([b"not an image\n" * 100], "not an image"),
        "empty": ([b""], "empty upload"),
        "over the size limit": ([os.urandom(int(max_upload_mb * 2**20) + 4096)], "the limit is"),
    }


def post(http: httpx.Client, url: str, name: str, body: bytes) -> tuple[int, str]:
    r = http.post(f"{url}/api/caption", files={"file": (name, body, "application/octet-stream")})
    return r.status_code, r.json().get("detail", "") if r.status_code != 200 else ""


def slow_post(url: str, body: bytes, seconds: float = 3.0) -> tuple[int, str]:
    """The body in 16 pieces over `seconds`, with an honest Content-Length (as a browser on a bad link)."""
    pieces = [body[k * len(body) // 16:(k + 1) * len(body) // 16] for k in range(16)]

    def trickle():
        for piece in pieces:
            time.sleep(seconds / 16)
            yield piece
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/api/caption", content=trickle(),
                      headers={"content-length": str(len(body)), "content-type": "image/jpeg"})
    return r.status_code, r.json().get("detail", "") if r.status_code != 200 else ""


def aborted_post(port: int, body: bytes) -> tuple[int, str]:
    """Announce the whole body, send a third of it, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/jpeg\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 3])
    return 0, ""  # no answer is expected


def start_server(port: int, args) -> subprocess.Popen:
    return launch_server(port, ["--max-upload-mb", str(args.max_upload_mb)], args.model, args.server_log)


def good_photos(folder: Path, n: int = 100) -> list[bytes]:
    paths = sorted(folder.glob("*.jpg"))[:n]
    if paths:
        return [p.read_bytes() for p in paths]
    rng = np.random.default_rng(0)  # no Flickr8k here: noisy gradients stand in for photos
    out = []
    for i in range(20):
        y, x = np.mgrid[0:375, 0:500]
        arr = np.stack([x // 2 + i * 10, y // 2, (x + y) // 4], -1) % 256 + rng.integers(0, 30, (375, 500, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60, help="length of the load")
    p.add_argument("--after", type=float, default=30, help="seconds of RSS sampling after the load")
    p.add_argument("--good-share", type=float, default=0.5, help="share of uploads that are good photos")
    p.add_argument("--max-upload-mb", type=float, default=10)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--images", type=Path, default=IMAGES)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "adversarial_load.json")
    p.add_argument("--server-log", type=Path, default=None, help="write the server's output here")
    args = p.parse_args()

    good = good_photos(args.images)
    kinds = uploads(good, args.max_upload_mb)
    bad_kinds = [k for k in kinds if k != "good photo"] + ["slow upload", "aborted upload"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, args)
    records = []  # (kind, status, detail, seconds taken, seconds into the load when sent)
    t0_box = [0.0]
    rss = []      # (seconds since start of load, MB)
    done = threading.Event()

    def sample(t0):
        while not done.is_set():
            rss.append((time.perf_counter() - t0, rss_mb(proc.pid)))
            time.sleep(0.1)

    def client(seed: int, stop_at: float):
        rnd = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < stop_at:
                kind = "good photo" if rnd.random() < args.good_share else rnd.choice(bad_kinds)
                t = time.perf_counter()
                try:
                    if kind == "slow upload":
                        status, detail = slow_post(url, rnd.choice(good))
                    elif kind == "aborted upload":
                        status, detail = aborted_post(port, rnd.choice(good))
                    else:
                        bodies, _ = kinds[kind]
                        status, detail = post(http, url, f"{kind.split()[0]}.bin", rnd.choice(bodies))
                except (httpx.HTTPError, OSError) as e:
                    status, detail = -1, f"{type(e).__name__}: {e}"
                records.append((kind, status, detail, time.perf_counter() - t, t - t0_box[0]))

    try:
        for body in good[:8]:  # warm-up: first calls pay for lazy initialisation
            httpx.post(f"{url}/api/caption", content=body, timeout=60)
        rss_start, load_start = rss_mb(proc.pid), os.getloadavg()[0]
        print(f"server pid {proc.pid}: RSS {rss_start:.0f} MB, load average {load_start:.2f}; "
              f"{args.clients} clients for {args.seconds:g} s")
        t0 = t0_box[0] = time.perf_counter()
        sampler = threading.Thread(target=sample, args=(t0,), daemon=True)
        sampler.start()
        with ThreadPoolExecutor(args.clients) as pool:
            for f in [pool.submit(client, i, t0 + args.seconds) for i in range(args.clients)]:
                f.result()
        load_s = time.perf_counter() - t0
        time.sleep(args.after)
        done.set()
        sampler.join()
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(15)

    by_kind = defaultdict(Counter)
    wrong = []
    for kind, status, detail, _, start in records:
        by_kind[kind][status] += 1
        words = kinds[kind][1] if kind in kinds else ""
        expected_ok = kind in ("good photo", "valid 64 MP PNG", "slow upload")
        if status == 503 or kind == "aborted upload":
            continue  # load shed (counted below), or no answer expected
        if (expected_ok and status != 200) or (not expected_ok and not (400 <= status < 500 and words in detail)):
            wrong.append(f"{kind}: {status} {detail[:120]} (sent at {start:.1f} s)")
    good_ms = np.array([s for k, st, _, s, _ in records if k == "good photo" and st == 200]) * 1000
    during = [mb for t, mb in rss if t <= load_s]
    report = {
        "clients": args.clients, "seconds": round(load_s, 1), "requests": len(records), "cpus": os.cpu_count(),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0],
        "status_by_kind": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        "count_5xx": sum(1 for _, st, _, _, _ in records if st >= 500 and st != 503),
        "count_503_shed": sum(1 for _, st, _, _, _ in records if st == 503),
        "unexpected": len(wrong), "unexpected_first": wrong[:10],
        "good_p50_ms": round(float(np.median(good_ms)), 1) if len(good_ms) else None,
        "good_p99_ms": round(float(np.percentile(good_ms, 99)), 1) if len(good_ms) else None,
        "rss_mb_start": round(rss_start, 1), "rss_mb_peak": round(max(during, default=float("nan")), 1),
        "rss_mb_after": round(rss_after, 1), "after_s": args.after,
    }
    for kind, counts in report["status_by_kind"].items():
        print(f"  {kind:<38} {counts}")
    print(f"{report['requests']} requests in {report['seconds']} s: {report['count_5xx']} 5xx, "
          f"{report['count_503_shed']} shed (503), {report['unexpected']} unexpected answers; good photos "
          f"p50 {report['good_p50_ms']} ms, p99 {report['good_p99_ms']} ms")
    print(f"server RSS {report['rss_mb_start']:.0f} MB at start, peak {report['rss_mb_peak']:.0f} MB, "
          f"{report['rss_mb_after']:.0f} MB {args.after:g} s after the load")
    for line in wrong[:10]:
        print(f"  unexpected: {line}")
    from captioner.io import atomic_write_json
    atomic_write_json(args.json, report)


if __name__ == "__main__":
    main()
