"""What `pip install captioner` costs: the wheel (tools/build_wheel.py, the shipped model inside as ONNX graphs)
installed into a fresh venv outside the repo, its size on disk, package by package, and the first caption.

    python benchmarks/install_size.py [--keep VENV] --out benchmarks/results/install_size.json

Size = the venv's site-packages without pip and setuptools (what any venv has). For comparison the same count
for this checkout's `make install` venv (.venv: torch CPU and every extra). About a minute on 2 cores, most of
it building the wheel; pip fetches onnxruntime, numpy and Pillow from the registry (or its cache).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from build_wheel import build_wheel  # noqa: E402

from captioner.io import atomic_write_json  # noqa: E402

VENV_OWN = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")


def size_mb(path: Path) -> float:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() \
        else path.stat().st_size
    return total / 2**20


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def packages(venv: Path) -> dict[str, float]:
    """MB per top-level entry of site-packages, the venv's own tools left out, largest first."""
    sp = site_packages(venv)
    sizes = {p.name: size_mb(p) for p in sp.iterdir() if not p.name.startswith(VENV_OWN)}
    return dict(sorted(((k, round(v, 1)) for k, v in sizes.items() if v >= 0.05), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="create the venv here and keep it (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "install_size.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp) / "dist")
        venv = args.keep or Path(tmp) / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        t0 = time.perf_counter()
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True)
        install_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = subprocess.run([str(venv / "bin" / "captioner"), "caption", str(ROOT / "examples")], check=True,
                             capture_output=True, text=True, cwd=tmp).stdout
        first_s = time.perf_counter() - t0
        sizes = packages(venv)
        has_torch = (site_packages(venv) / "torch").exists()
        result = {"wheel_mb": round(size_mb(wheel), 1), "installed_mb": round(sum(sizes.values()), 1),
                  "packages_mb": sizes, "torch_installed": has_torch, "pip_install_s": round(install_s, 1),
                  "caption_examples_s": round(first_s, 2), "captions": out.splitlines(),
                  "dev_venv_mb": round(sum(packages(ROOT / ".venv").values()), 1) if (ROOT / ".venv").is_dir() else None,
                  "goal_mb": 150, "loadavg": [round(x, 2) for x in os.getloadavg()]}
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "captions"}, indent=1))
    print("\n".join(result["captions"]))


if __name__ == "__main__":
    main()
