"""Live mode's speed: frames captioned per second and frame-to-caption latency over /api/live, 1 and 4 clients.

    .venv/bin/python benchmarks/live.py                            # 1 and 4 clients, 20 s each, beam 3
    .venv/bin/python benchmarks/live.py --clients 1,4,8 --seconds 30 --beam 1

Starts `captioner serve` on a free loopback port, then each client does what the page's live mode does: it
sends one JPEG frame (a coco-ood-dev photo reduced to 480 px on its long side, quality 80, as the page sends)
over a WebSocket, waits for the caption, and sends the next (one frame in flight). Reports, per number of
clients, frames captioned per second (all clients together and per client) and frame-to-caption latency as
the client sees it (send -> answer; median and 95th percentile), and the server's own share of it. Goal: one
client >= 8 frames/s with p95 <= 150 ms on 2 cores. Writes benchmarks/results/live.json with the load average.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, launch_server  # noqa: E402  (the same server start as the HTTP load test)

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "coco-ood-dev" / "images"


def camera_frames(folder: Path, n: int = 32, side: int = 480) -> list[bytes]:
    frames = []
    for path in sorted(folder.glob("*.jpg"))[:n]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        frames.append(buf.getvalue())
    return frames


def run_level(url: str, clients: int, frames: list[bytes], seconds: float) -> dict:
    """`clients` live clients for `seconds`: each sends a frame, waits for its answer, sends the next."""
    records, errors, lock = [], [], threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int):
        with connect(url, max_size=2**22) as ws:
            i = k * 7
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                ws.send(frames[i % len(frames)])
                answer = json.loads(ws.recv())
                with lock:
                    if "error" in answer:
                        errors.append(answer["error"])
                    else:
                        records.append((time.perf_counter() - t, answer["ms"] / 1000, time.perf_counter()))
                i += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    latency = np.array([r[0] for r in records]) * 1000
    server = np.array([r[1] for r in records]) * 1000
    fps = len(records) / wall
    return {"clients": clients, "frames": len(records), "errors": len(errors), "seconds": round(wall, 1),
            "frames_per_s": round(fps, 2), "frames_per_s_per_client": round(fps / clients, 2),
            "p50_ms": round(float(np.percentile(latency, 50)), 1),
            "p95_ms": round(float(np.percentile(latency, 95)), 1),
            "server_p50_ms": round(float(np.percentile(server, 50)), 1),
            "server_p95_ms": round(float(np.percentile(server, 95)), 1), "first_errors": errors[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,4", help="comma-separated numbers of simultaneous live clients")
    p.add_argument("--seconds", type=float, default=20, help="time per level")
    p.add_argument("--beam", type=int, default=3, help="beam size the clients ask for (the page's default: 3)")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--images", type=Path, default=PHOTOS, help="folder of .jpg photos used as camera frames")
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "live.json")
    args = p.parse_args()

    frames = camera_frames(args.images)
    if not frames:
        sys.exit(f"error: {args.images}: no .jpg photos found")
    port = free_port()
    proc = launch_server(port, [], args.model)
    url = f"ws://127.0.0.1:{port}/api/live?beam={args.beam}"
    try:
        run_level(url, 1, frames, 3)  # warm-up: first calls pay for lazy initialisation
        report = {"beam": args.beam, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
                  "frame_kb": round(sum(map(len, frames)) / len(frames) / 1024, 1), "levels": []}
        print(f"{os.cpu_count()} CPUs, load average {report['load_avg_start']:.2f}, beam {args.beam}, "
              f"frames {report['frame_kb']} KB on average")
        print(f"{'clients':>7} {'frames':>7} {'frames/s':>9} {'per client':>10} {'p50 ms':>7} {'p95 ms':>7} "
              f"{'server p50':>10} {'server p95':>10} {'errors':>6}")
        for clients in [int(c) for c in args.clients.split(",")]:
            r = run_level(url, clients, frames, args.seconds)
            report["levels"].append(r)
            print(f"{r['clients']:>7} {r['frames']:>7} {r['frames_per_s']:>9} {r['frames_per_s_per_client']:>10} "
                  f"{r['p50_ms']:>7} {r['p95_ms']:>7} {r['server_p50_ms']:>10} {r['server_p95_ms']:>10} "
                  f"{r['errors']:>6}")
        report["load_avg_end"] = os.getloadavg()[0]
        print(f"load average now {report['load_avg_end']:.2f}")
    finally:
        proc.terminate()
        proc.wait(15)
    from captioner.io import atomic_write_json
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
