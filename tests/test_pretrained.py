"""Model folders (pretrained.py) and the torch-free runtime (runtime.py, beam.py): export -> load -> the same
captions as the torch model, a checked format, the CLI, and captioning with torch unimportable."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.apps.api import Captioner
from captioner.apps.cli import main
from captioner.pretrained import FORMAT, read_model_folder, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
OOD = ROOT.parent / "shared" / "coco-ood-dev" / "images"


@pytest.fixture(scope="module")
def folder(model_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "flickr8k"
    info = save_pretrained(model_path, out)
    assert max(info["onnx_check"]["max_abs_error"].values()) <= info["onnx_check"]["tolerance"] == 1e-4
    return out


def test_folder_holds_what_other_tools_need(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "vocab.json", "model.safetensors", "encoder.onnx", "encoder_int8.onnx", "decoder_init.onnx",
            "decoder_step.onnx", "grounding.onnx", "README.md"} <= names
    info = read_model_folder(folder)
    assert info["format"] == FORMAT and info["encoder"] == "lite2" and len(info["vocab"]) == 2537
    assert info["grounding"]["learnt"].count(True) == 37
    assert "Dev-split scores" in (folder / "README.md").read_text()


def test_onnx_runtime_gives_the_torch_models_captions(folder, model_path, flickr8k_root):
    """The same n-best lists as the float torch decoder; scores within 1e-3 (float32 rounding differs)."""
    dev = sorted((flickr8k_root / "images").glob("*.jpg"))[:12]
    photos = EXAMPLES + sorted(OOD.glob("*.jpg"))[:12] + dev
    onnx = Captioner.load(folder, runtime="onnx")
    torch_float = Captioner.load(model_path, int8=False)
    assert onnx.info["runtime"] == "onnx" and torch_float.info["runtime"] == "torch"
    feats = torch_float.encoder.encode_images(photos)
    a = torch_float.caption_features(feats, n_best=3)
    b = onnx.caption_features(feats, n_best=3)
    for x, y in zip(a, b):
        assert (x.text, x.alternatives and [h["caption"] for h in x.alternatives]) == \
               (y.text, [h["caption"] for h in y.alternatives])
        assert abs(x.score - y.score) < 1e-3 and x.confidence == pytest.approx(y.confidence, abs=1e-4)
    # the folder's own encoder graphs: the float one gives the cached export's grids, the int8 one is the default
    assert onnx.encoder.backend == "onnx-int8"
    exact = Captioner.load(folder, runtime="onnx", int8=False)
    assert exact.encoder.backend == "onnx" and abs(exact.encoder.encode_images(photos[:2]) - feats[:2]).max() < 1e-4


def test_torch_runtime_reads_the_folder_too(folder, model_path):
    from_file = Captioner.load(model_path).caption_batch(EXAMPLES)
    from_folder = Captioner.load(folder, runtime="torch").caption_batch(EXAMPLES)
    assert [r.text for r in from_file] == [r.text for r in from_folder]


def test_folder_format_is_checked(folder, tmp_path):
    import shutil
    bad = tmp_path / "newer"
    shutil.copytree(folder, bad)
    info = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**info, "format": "captioner-model/2"}))
    with pytest.raises(ValueError, match=r"config.json: format 'captioner-model/2'.*upgrade captioner"):
        Captioner.load(bad, runtime="onnx")
    (bad / "config.json").write_text(json.dumps(info))
    (bad / "decoder_step.onnx").unlink()
    with pytest.raises(ValueError, match=r"decoder_step.onnx: missing"):
        Captioner.load(bad, runtime="onnx")
    with pytest.raises(ValueError, match="not a model folder"):
        Captioner.load(tmp_path, runtime="onnx")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a model folder; choose an empty or new folder"):
        save_pretrained(None, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_exports_and_captions_with_a_folder(folder, model_path, tmp_path, capsys):
    assert main(["export", str(tmp_path / "m"), "--model", str(model_path)]) == 0
    assert "model folder of flickr8k-sat written" in capsys.readouterr().out
    assert main(["caption", "--model", str(tmp_path / "m"), "--runtime", "onnx", str(EXAMPLES[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{EXAMPLES[0]}\t{Captioner.load(folder, runtime='onnx').caption(EXAMPLES[0]).text}"
    assert main(["caption", "--model", str(model_path), "--runtime", "onnx", str(EXAMPLES[0])]) == 2
    assert "needs a model folder" in capsys.readouterr().err


def test_captions_with_torch_unimportable(folder, tmp_path):
    """A `torch` that fails to import (as in an install without it): auto picks the ONNX graphs."""
    blocker = tmp_path / "block" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed (blocked by the test)')\n")
    code = ("import sys, json\nfrom captioner import Captioner\n"
            f"c = Captioner.load({str(folder)!r})\nr = c.caption({str(EXAMPLES[0])!r})\n"
            "print(json.dumps([c.info['runtime'], r.text, 'torch' in sys.modules and sys.modules['torch'] is not None]))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'block'}{os.pathsep}{ROOT / 'src'}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    runtime, text, torch_loaded = json.loads(out.splitlines()[-1])
    assert runtime == "onnx" and not torch_loaded
    assert text == Captioner.load(folder, runtime="onnx").caption(EXAMPLES[0]).text


def test_decoder_options_export_to_the_same_outputs(tmp_path):
    """A decoder with concept input, attention on attention and a pyramid exports to graphs that match torch
    (checked by save_pretrained at another batch size than traced)."""
    from captioner.checkpoint import save_checkpoint
    from captioner.config import Config
    from captioner.data.vocab import Vocabulary
    from captioner.model import ShowAttendTell
    config = Config(concept_input=True, aoa=True, pyramid=3, embed_dim=32, project_dim=32, attention_dim=16,
                    decoder_dim=32)
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + ["a", "cat", "on", "sofa"])
    model = ShowAttendTell(config, len(vocab))
    model.load_imagenet()
    save_checkpoint(tmp_path / "m.safetensors", model, vocab, config, {})
    check = save_pretrained(tmp_path / "m.safetensors", tmp_path / "folder")["onnx_check"]
    assert {"decoder_init", "decoder_step"} <= set(check["max_abs_error"])
    assert max(check["max_abs_error"].values()) <= check["tolerance"]
    assert Captioner.load(tmp_path / "folder", runtime="onnx").caption(EXAMPLES[0]).text
