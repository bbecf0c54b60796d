"""The package a user installs: the wheel built by `make wheel` (tools/build_wheel.py), installed into a fresh
venv outside the repo, captions photos from the command line and from Python without torch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "cat.jpg"


@pytest.mark.slow
def test_wheel_installs_and_captions_without_torch(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from build_wheel import build_wheel
    finally:
        sys.path.remove(str(ROOT / "tools"))
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True, cwd=tmp_path)
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert "torch" not in run(str(py), "-m", "pip", "list").lower().split()
    line = run(str(venv / "bin" / "captioner"), "caption", str(CAT)).strip()
    assert line == f"{CAT}\ta picture of a cat"
    out = run(str(py), "-c", "import json, sys\nfrom captioner import Captioner\nc = Captioner.load()\n"
              f"r = c.caption({str(CAT)!r})\nprint(json.dumps([c.info['runtime'], r.text, r.concepts[0]['word'], "
              "'torch' in sys.modules]))")
    assert json.loads(out) == ["onnx", "a picture of a cat", "cat", False]
    # what the base install lacks is named with the extra that brings it
    missing = subprocess.run([str(venv / "bin" / "captioner"), "serve"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "pip install 'captioner[serve]'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
