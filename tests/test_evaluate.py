"""`captioner evaluate` end to end: a tiny random model on real Flickr8k images, the feature-store path,
scoring other systems' captions, bad input, and the report."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.apps.cli import main
from captioner.checkpoint import save_checkpoint
from captioner.config import Config
from captioner.data.vocab import Vocabulary
from captioner.evaluation.evaluate import evaluate, load_references_file, load_results_file
from captioner.evaluation.metrics import METRIC_KEYS, score_captions
from captioner.evaluation.report import plot_attention, write_report
from captioner.model import ShowAttendTell

WORDS = ["a", "dog", "runs", "on", "the", "grass", "man", "in", "red", "water", "two", "is"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised lite0 model (7x7 grid) saved the way training saves checkpoints."""
    torch.manual_seed(0)
    cfg = Config(encoder="lite0", feature_dim=1280, num_regions=49, embed_dim=16, attention_dim=16,
                 decoder_dim=16, project_dim=16)
    vocab = Vocabulary([*Vocabulary.SPECIALS, *WORDS])
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(path, ShowAttendTell(cfg, len(vocab)), vocab, cfg,
                    {"name": "tiny-random", "encoder": "lite0", "epoch": 0, "dev_scores": {}})
    return path


def dev_names(root, n):
    return (root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:n]


def flickr_refs(root, names):
    refs = {}
    for line in (root / "text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        name, caption = line.split("\t")
        name = name.split("#")[0]
        if name in names:
            refs.setdefault(name, []).append(caption)
    return refs


def test_model_on_20_real_dev_images(tiny_model, flickr8k_root, tmp_path):
    out = tmp_path / "eval"
    m = evaluate(tiny_model, flickr8k_root, "dev", beam_size=2, out=out, limit=20, batch_size=8,
                 meteor=False, backend="torch", progress=False)
    assert m["num_images"] == 20 and m["split"] == "dev" and m["beam_size"] == 2
    assert m["model"] == "tiny-random" and m["encoder"] == "lite0"
    assert m["features_encoded"] == 20 and m["features_from_store"] == 0  # a raw ROOT has no store
    assert set(METRIC_KEYS) <= set(m) and m["meteor"] is None

    written = json.loads((out / "metrics.json").read_text())
    assert written == m
    captions = json.loads((out / "captions.json").read_text())
    assert [c["image_id"] for c in captions] == dev_names(flickr8k_root, 20)
    assert all(c["caption"] and set(c["caption"].split()) <= set(WORDS) for c in captions)
    # the numbers are the metrics of exactly these captions against the split's original captions
    refs = flickr_refs(flickr8k_root, {c["image_id"] for c in captions})
    again = score_captions({c["image_id"]: c["caption"] for c in captions}, refs, meteor=False)
    for k in ("bleu1", "bleu4", "rougeL", "cider"):
        assert m[k] == pytest.approx(again.corpus[k], abs=1e-12)

    page = (out / "report.html").read_text()
    assert page.count("<tr><td data-v=") == 20 and page.count("data:image/jpeg;base64,") == 20
    assert page.count("<figure>") == 8 and "data:image/png;base64," in page  # attention overlays
    assert "http://" not in page and "https://" not in page  # self-contained


def test_workdir_store_then_on_the_fly_then_bad_image(tiny_model, flickr8k_root, tmp_path):
    from captioner.data.datasets import prepare
    from captioner.features.store import build_features
    names = dev_names(flickr8k_root, 7)
    images = tmp_path / "ds" / "images"
    images.mkdir(parents=True)
    for n in names:
        shutil.copy(flickr8k_root / "images" / n, images / n)
    refs = flickr_refs(flickr8k_root, set(names))
    rows = ["image,caption,split"] + [f"{n},\"{c}\",dev" for n in names[:6] for c in refs[n]]
    (tmp_path / "ds" / "captions.csv").write_text("\n".join(rows) + "\n")
    work = tmp_path / "work"
    prepare(tmp_path / "ds" / "captions.csv", work, min_count=1, progress=False)
    build_features(work, encoder="lite0", backend="torch", progress=False)
    # after the store was built: one more image (not in the store) and one broken file
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with open(work / "dataset.jsonl", "a", encoding="utf-8") as f:
        for n, path in ((names[6], images / names[6]), ("broken.jpg", images / "broken.jpg")):
            f.write(json.dumps({"image_id": n, "path": str(path), "split": "dev",
                                "captions": refs[names[6]], "tokens": [["a"]]}) + "\n")

    m = evaluate(tiny_model, work, "dev", beam_size=1, out=tmp_path / "out", meteor=False, backend="torch",
                 progress=False)
    assert (m["features_from_store"], m["features_encoded"], m["unreadable"]) == (6, 1, 1)
    assert m["num_images"] == 7
    assert any("broken.jpg" in n for n in m["notes"])


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_scores_another_systems_captions_against_the_dataset(flickr8k_root, tmp_path):
    names = dev_names(flickr8k_root, 10)
    refs = flickr_refs(flickr8k_root, set(names))
    results = [{"image_id": n, "caption": refs[n][0]} for n in names]
    m = evaluate(None, flickr8k_root, "dev", out=tmp_path, captions_file=_write(tmp_path / "r.json", results),
                 meteor=False, progress=False)
    direct = score_captions({n: refs[n][0] for n in names}, refs, meteor=False)
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"):
        assert m[k] == pytest.approx(direct.corpus[k], abs=1e-12)
    assert m["num_images"] == 10 and m["bleu4"] > 0.5  # a caption scored against itself among others
    assert any("990 image(s)" in n for n in m["notes"])
    assert (tmp_path / "report.html").is_file()


def test_references_files_and_bad_result_items(tmp_path):
    refs = {"1": ["a dog runs on the grass", "a brown dog running"], "2": ["two men in red", "men wearing red"]}
    coco = {"images": [{"id": 1, "file_name": "dog.jpg"}, {"id": 2, "file_name": "men.jpg"}],
            "annotations": [{"image_id": int(k), "caption": c} for k, cs in refs.items() for c in cs]}
    jsonl = tmp_path / "refs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": k, "caption": c}) for k, cs in refs.items() for c in cs))
    results = [{"image_id": 1, "caption": "a dog on the grass"}, {"image_id": 2, "caption": "two men"},
               {"image_id": 2, "caption": "a duplicate"}, {"caption": "no id"}, "junk",
               {"image_id": 99, "caption": "unknown image"}]
    res = _write(tmp_path / "res.json", results)
    a = evaluate(None, None, out=tmp_path / "a", captions_file=res,
                 references_file=_write(tmp_path / "coco.json", coco), meteor=False, progress=False)
    b = evaluate(None, None, out=tmp_path / "b", captions_file=res, references_file=jsonl, meteor=False,
                 progress=False)
    assert a["num_images"] == b["num_images"] == 2
    for k in ("bleu1", "bleu4", "rougeL", "cider"):
        assert a[k] == b[k]
    notes = " | ".join(a["notes"])
    assert "skipped 2 item(s)" in notes and "1 extra caption" in notes and "without references" in notes
    assert load_references_file(tmp_path / "coco.json")["dog.jpg"] == refs["1"]  # file names work as ids
    with pytest.raises(ValueError, match="no usable captions"):
        load_results_file(_write(tmp_path / "empty.json", [{"caption": 3}]))


def test_cli_prints_table_and_reports_bad_files_in_one_line(tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"image": "x.jpg", "caption": "a dog runs"}) + "\n")
    res = _write(tmp_path / "res.json", [{"image_id": "x.jpg", "caption": "a dog runs"}])
    assert main(["evaluate", "--captions", str(res), "--references", str(refs), "--out", str(tmp_path / "o"),
                 "--no-meteor"]) == 0
    printed = capsys.readouterr().out
    assert "BLEU-1" in printed and "CIDEr-D" in printed and "1.0000" in printed
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["evaluate", "--captions", str(bad), "--references", str(refs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err and "not JSON" in err
    assert main(["evaluate", "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


def test_plot_attention_and_report_escape(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    buf = io.BytesIO()
    plot_attention(img, ["a", "dog"], np.random.rand(2, 3, 3), buf)
    assert Image.open(io.BytesIO(buf.getvalue())).format == "PNG"
    with pytest.raises(ValueError, match="len\\(words\\)"):
        plot_attention(img, ["a", "dog"], np.random.rand(3, 3, 3), io.BytesIO())
    items = [{"image_id": "x<1>.jpg", "caption": "<script>alert(1)</script>", "references": ["a & b"],
              "scores": {"cider": 0.5, "bleu4": 0.1}, "path": None}]
    write_report(tmp_path / "r.html", items, {k: 0.1 for k in METRIC_KEYS})
    page = (tmp_path / "r.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b" in page and "addEventListener('click'" in page
