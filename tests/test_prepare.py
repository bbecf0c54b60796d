import json

import pytest

from captioner.apps.cli import main
from captioner.data.datasets import load_prepared, prepare
from captioner.data.vocab import Vocabulary


def make_csv(root, n_images=10):
    """Custom CSV with a split column: words "common" in every caption, "rare<i>" once each."""
    rows = ["image,caption,split"]
    for i in range(n_images):
        split = "train" if i < 6 else "dev" if i < 8 else "test"
        rows += [f"img{i}.jpg,A common dog number {i} rare{i} .,{split}",
                 f"img{i}.jpg,\"Common, dog's {'very ' * i}long caption\",{split}"]
    (root / "caps.csv").write_text("\n".join(rows) + "\n")
    (root / "img0.jpg").write_bytes(b"\xff\xd8")  # only presence is checked here
    return root / "caps.csv"


def test_prepare_writes_workdir_and_loads_back(tmp_path):
    summary = prepare(make_csv(tmp_path), tmp_path / "work", min_count=2, progress=False)
    work = tmp_path / "work"
    assert {p.name for p in work.iterdir()} == {"dataset.jsonl", "vocab.json", "summary.json"}
    assert summary == json.loads((work / "summary.json").read_text())
    assert summary["layout"] == "csv"
    assert summary["splits"] == {"train": {"images": 6, "present": 1, "absent": 5, "captions": 12},
                                 "dev": {"images": 2, "present": 0, "absent": 2, "captions": 4},
                                 "test": {"images": 2, "present": 0, "absent": 2, "captions": 4}}
    # train words with count >= 2: a common dog number long caption dogs very (+ digits 0..5 once: unk)
    vocab = Vocabulary.load(work / "vocab.json")
    assert set(vocab.itos[4:]) == {"a", "common", "dog", "number", "dogs", "long", "caption", "very"}
    assert summary["vocab_size"] == len(vocab) == 12
    # every first caption of train has 2 unknowns (digit and rare word) among its 6 tokens
    train_tokens = 6 * 6 + sum(4 + i for i in range(6))
    assert summary["unk_rate_train"] == pytest.approx(12 / train_tokens, abs=1e-6)
    assert summary["caption_length"]["max"] == 4 + 9
    assert summary["caption_length"]["p50"] <= summary["caption_length"]["p90"] <= summary["caption_length"]["p99"]

    data = load_prepared(work)
    assert data.vocab == vocab and data.summary == summary
    assert [r.image_id for r in data.split("dev")] == ["img6.jpg", "img7.jpg"]
    img0 = data.split("train")[0]
    assert img0.path == tmp_path / "img0.jpg"
    assert img0.captions[1] == "Common, dog's long caption"        # original text kept for references
    assert data.tokens["img0.jpg"] == [["a", "common", "dog", "number", "0", "rare0"],
                                       ["common", "dogs", "long", "caption"]]
    with pytest.raises(ValueError, match="unknown split"):
        data.split("val")


def test_prepare_max_len_cuts_stored_tokens_only(tmp_path):
    summary = prepare(make_csv(tmp_path), tmp_path / "work", max_len=5, progress=False)
    data = load_prepared(tmp_path / "work")
    assert max(len(t) for ts in data.tokens.values() for t in ts) == 5
    assert summary["caption_length"]["max"] == 13  # the statistics describe the full captions
    assert summary["truncated_captions"] == 10 + 8  # every 6-token first caption, and "very" x2..x9
    assert data.split("test")[1].captions[1].count("very") == 9


def test_load_prepared_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere/dataset.jsonl: missing"):
        load_prepared(tmp_path / "nowhere")
    prepare(make_csv(tmp_path), tmp_path / "work", progress=False)
    data_file = tmp_path / "work" / "dataset.jsonl"
    lines = data_file.read_text().splitlines()
    data_file.write_text("\n".join(lines[:3] + ['{"image_id": "x"'] + lines[3:]))
    with pytest.raises(ValueError, match=r"dataset.jsonl:4: damaged record"):
        load_prepared(tmp_path / "work")
    data_file.write_text("\n".join(lines))
    (tmp_path / "work" / "vocab.json").write_text("[]")
    with pytest.raises(ValueError, match="vocab.json: not a vocabulary file"):
        load_prepared(tmp_path / "work")


def test_cli_prepare_prints_table(tmp_path, capsys):
    assert main(["prepare", str(make_csv(tmp_path)), "--out", str(tmp_path / "w"), "--min-count", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "layout csv" in out
    assert "train        6        1       5        12" in out
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["min_count"] == 1


def test_cli_prepare_bad_root_is_one_line_error(tmp_path, capsys):
    (tmp_path / "readme.md").write_text("nothing here")
    assert main(["prepare", str(tmp_path), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "Flickr8k.token.txt" in err and "captions.txt" in err
    assert not (tmp_path / "w").exists()


def test_prepare_real_flickr8k(flickr8k_root, tmp_path):
    summary = prepare(flickr8k_root, tmp_path / "w", progress=False)
    s = summary["splits"]
    assert (s["train"]["images"], s["train"]["present"]) == (6000, 6000)
    assert (s["dev"]["images"], s["dev"]["present"]) == (1000, 1000)
    assert (s["test"]["images"], s["test"]["present"], s["test"]["absent"]) == (1000, 0, 1000)
    assert 30000 - 50 < s["train"]["captions"] <= 30000  # a few exact duplicates dropped
    assert 2000 < summary["vocab_size"] < 3500 and 0 < summary["unk_rate_train"] < 0.05
    data = load_prepared(tmp_path / "w")
    assert len(data.records) == 8000 and len(data.vocab) == summary["vocab_size"]


def test_prepare_with_nothing_usable_fails_clearly(tmp_path):
    (tmp_path / "bad.csv").write_text("image,caption\nnot_an_image.txt,hello\na.jpg,...\n")
    with pytest.raises(ValueError, match=r"bad.csv: no usable captions"):
        prepare(tmp_path / "bad.csv", tmp_path / "w", progress=False)
