"""Same photo, same description: alone, in batches of 1 to 64, and through the server under 8 concurrent clients.

    python benchmarks/determinism.py [--photos 64] [--model CKPT]
        -> benchmarks/results/determinism.json

Photos: the first Flickr8k dev photos plus ../shared/coco-ood-dev and examples/ (everyday photos, where grounding
hedges and decodes twice most often). For each photo the reference is `Captioner.caption(photo)` alone; every
other way of asking must give the identical text, caption, score and confidence. The server runs in-process
(FastAPI's TestClient, the same micro-batching as `captioner serve`). About 2 min on 2 CPU cores.
"""
import argparse
import json
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from captioner.apps.api import Captioner
from captioner.apps.server import create_app

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def photos(n: int) -> list[Path]:
    coco = sorted((SHARED / "coco-ood-dev" / "images").glob("*.jpg"))[: n // 2]
    names = (SHARED / "flickr8k" / "text" / "Flickr_8k.devImages.txt").read_text().split()
    examples = sorted((ROOT / "examples").glob("*.jpg"))
    flickr = [SHARED / "flickr8k" / "images" / x for x in names][: n - len(coco) - len(examples)]
    return flickr + coco + examples


def key(r) -> tuple:
    return r.text, r.caption, r.score, r.confidence


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "determinism.json"))
    args = ap.parse_args()
    c = Captioner.load(args.model)
    items = photos(args.photos)
    alone = [key(c.caption(p)) for p in items]
    report = {"photos": len(items), "decoder_weights": c.info["decoder_weights"], "grounded": c.info["grounded"],
              "batches": {}}
    for size in (1, 2, 3, 7, 16, 33, 64):
        got = [key(r) for i in range(0, len(items), size) for r in c.caption_batch(items[i:i + size])]
        report["batches"][size] = sum(a != b for a, b in zip(alone, got))
    served, errors = {}, []
    with TestClient(create_app(c, max_upload_mb=10), base_url="http://127.0.0.1:8000") as client:
        def worker(k):
            for i in range(k, len(items), 8):
                r = client.post("/api/caption", files={"file": (items[i].name, items[i].read_bytes(), "image/jpeg")})
                if r.status_code == 200:
                    b = r.json()
                    served[i] = (b["text"], b["caption"], b["confidence"])
                else:
                    errors.append(r.text)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report["server_8_clients"] = {"errors": len(errors),
                                  "differing": sum(served.get(i) != alone[i][:2] + (alone[i][3],)
                                                   for i in range(len(items)))}
    report["hedged"] = sum(not a[0].startswith(a[1]) for a in alone)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
