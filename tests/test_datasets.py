"""Every layout, generated small in tmp_path, with the messy input each one meets in the wild."""
import json

import pytest
from PIL import Image

from captioner.data.datasets import read_dataset

IMAGES = ["1000_a.jpg", "1001_b.jpg", "1002_c.jpg", "1003_d.jpg", "1004_e.jpg", "1005_f.jpg"]


def make_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (4, 4), "red").save(folder / n)


def by_id(readout):
    return {r.image_id: r for r in readout.records}


def token_lines():
    lines = []
    for name in IMAGES:
        lines += [f"{name}#{k}\tA dog number {k} runs on {name[:4]} ." for k in range(3)]
    return lines


def make_flickr8k(root, *, lines=None, encoding="utf-8", newline="\n", text_dir="Flickr8k_text",
                  image_dir="Flicker8k_Dataset", present=IMAGES[:5]):
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    (text / "Flickr8k.token.txt").write_bytes(newline.join(lines or token_lines()).encode(encoding))
    (text / "Flickr_8k.trainImages.txt").write_text("\n".join(IMAGES[:3]) + "\n")
    (text / "Flickr_8k.devImages.txt").write_text(IMAGES[3] + "\n")
    (text / "Flickr_8k.testImages.txt").write_text(IMAGES[4] + "\n")  # IMAGES[5] is in no split
    make_images(root / image_dir, present)
    return root


def test_flickr8k_original_layout(tmp_path):
    out = read_dataset(make_flickr8k(tmp_path, present=IMAGES[:4]))
    recs = by_id(out)
    assert out.layout == "flickr8k"
    assert [r.split for r in out.records] == ["train", "train", "train", "dev", "test"]
    assert recs["1000_a.jpg"].captions == [f"A dog number {k} runs on 1000 ." for k in range(3)]
    assert recs["1000_a.jpg"].path == tmp_path / "Flicker8k_Dataset" / "1000_a.jpg"
    assert recs["1000_a.jpg"].path.is_absolute()
    # named in a split, captioned, but its image file is absent: kept with path None, counted, named
    assert recs["1004_e.jpg"].path is None and out.counts["absent_test"] == 1
    assert any("1 test images" in p and "1004_e.jpg" in p for p in out.problems)
    # captioned but in no split: dropped with a count
    assert "1005_f.jpg" not in recs and out.counts["unsplit"] == 1


@pytest.mark.parametrize("text_dir, image_dir", [("", "images"), ("text", "Images"), ("Flickr8k_text", "Flickr8k_Dataset")])
def test_flickr8k_folder_variants(tmp_path, text_dir, image_dir):
    out = read_dataset(make_flickr8k(tmp_path, text_dir=text_dir, image_dir=image_dir))
    assert out.layout == "flickr8k"
    assert sum(r.path is not None for r in out.records) == 5


def test_flickr8k_bad_lines_are_reported_and_skipped(tmp_path):
    lines = token_lines() + [
        "2258277193_586949ec62.jpg.1#0\tA bogus entry .",    # line 19: not an image file name
        "1000_a.jpg#3 no tab here",                           # 20: no tab
        "1000_a.jpg\tno hash",                                # 21: no #k
        "1001_b.jpg#3\t   ",                                  # 22: empty caption
        "1001_b.jpg#4\t...",                                  # 23: only punctuation = empty
        "1002_c.jpg#3\ta dog number 0 runs on 1002",          # 24: duplicate after normalisation
        "",
        "1002_c.jpg#4\tA new caption .",                      # 26: fine
    ]
    out = read_dataset(make_flickr8k(tmp_path, lines=lines))
    token = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    problems = "\n".join(out.problems)
    assert f"{token}:19: '2258277193_586949ec62.jpg.1' is not an image file name" in problems
    for n in (20, 21, 22, 23):
        assert f"{token}:{n}:" in problems
    assert out.counts["bogus_names"] == 1 and out.counts["malformed"] == 4 and out.counts["duplicates"] == 1
    assert f"1 duplicate captions of the same image dropped: {token}:24" in problems
    recs = by_id(out)
    assert len(recs["1000_a.jpg"].captions) == 3 and len(recs["1001_b.jpg"].captions) == 3
    assert recs["1002_c.jpg"].captions[-1] == "A new caption ."
    assert all("\n" not in p for p in out.problems)  # every problem is one line


def test_crlf_bom_and_non_utf8(tmp_path):
    lines = token_lines()
    lines[0] = "1000_a.jpg#0\tA café dog ."
    out = read_dataset(make_flickr8k(tmp_path / "crlf", lines=["\ufeff" + lines[0]] + lines[1:], newline="\r\n"))
    recs = by_id(out)
    assert recs["1000_a.jpg"].captions[0] == "A café dog ."  # BOM gone, so the first line parsed
    assert all(not c.endswith("\r") for r in out.records for c in r.captions)
    assert out.counts["malformed"] == 0 and out.counts["problems"] == 1  # only the unsplit image

    out = read_dataset(make_flickr8k(tmp_path / "latin", lines=lines, encoding="cp1252"))
    assert by_id(out)["1000_a.jpg"].captions[0] == "A café dog ."
    assert any("Flickr8k.token.txt: not UTF-8 (bad byte 0xe9" in p and "cp1252" in p for p in out.problems)


def test_split_list_names_without_captions(tmp_path):
    root = make_flickr8k(tmp_path)
    with open(root / "Flickr8k_text" / "Flickr_8k.trainImages.txt", "a") as f:
        f.write("9999_ghost.jpg\n")
    out = read_dataset(root)
    assert "9999_ghost.jpg" not in by_id(out)
    assert out.counts["listed_without_captions_train"] == 1
    assert any("1 train images have no captions: 9999_ghost.jpg" in p for p in out.problems)


def test_missing_split_files_fall_back_to_shipped_lists(tmp_path):
    root = make_flickr8k(tmp_path)
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    out = read_dataset(root)
    assert any("Flickr_8k.devImages.txt" in p and "shipped" in p for p in out.problems)
    assert {r.split for r in out.records} == {"train", "test"}  # shipped dev list names none of these


def test_kaggle_layout(tmp_path):
    real = ["1000268201_693b08cb0e.jpg", "2513260012_03d33305cf.jpg", "3385593926_d3e9c21170.jpg"]
    # train, train, test in the official lists; "9_x.jpg" in no list
    rows = ["image,caption"] + [f"{n},A child in a dress , climbing ." for n in real] + [
        f'{real[0]},"A girl, quoted, with commas ."', f"{real[0]},a child in a dress climbing",  # dup
        "9_x.jpg,stray image", "no_comma_line", f"{real[1]},"]
    (tmp_path / "captions.txt").write_text("\n".join(rows))
    make_images(tmp_path / "Images", real[:2])
    out = read_dataset(tmp_path)
    recs = by_id(out)
    assert out.layout == "kaggle"
    assert recs[real[0]].captions == ["A child in a dress , climbing .", "A girl, quoted, with commas ."]
    assert (recs[real[0]].split, recs[real[2]].split) == ("train", "test")
    assert recs[real[2]].path is None and recs[real[1]].path == tmp_path / "Images" / real[1]
    assert "9_x.jpg" not in recs and out.counts["unsplit"] == 1
    assert out.counts["duplicates"] == 1 and out.counts["malformed"] == 2
    assert any(f"{tmp_path / 'captions.txt'}:8: expected 'image,caption'" in p for p in out.problems)


def test_kaggle_layout_for_other_datasets_draws_seeded_split(tmp_path):
    rows = ["image,caption"] + [f"{i:03d}.jpg,caption {i}" for i in range(20)]
    (tmp_path / "captions.txt").write_text("\n".join(rows))
    out = read_dataset(tmp_path, split_fractions=(0.5, 0.25, 0.25))
    assert [sum(r.split == s for r in out.records) for s in ("train", "dev", "test")] == [10, 5, 5]


def karpathy(images):
    return {"dataset": "flickr8k", "images": images}


def test_karpathy_layout(tmp_path):
    images = [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog .", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A bird ."}, {"raw": "a bird"}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A fish ."}, {"nothing": 1}]},
        {"filename": "e.jpg", "split": "holdout", "sentences": [{"raw": "x"}]},
        {"name": "f.jpg"},
    ]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(karpathy(images)))
    make_images(tmp_path / "Flicker8k_Dataset", ["a.jpg", "b.jpg", "c.jpg"])
    out = read_dataset(tmp_path)
    recs = by_id(out)
    assert out.layout == "karpathy"
    assert {i: r.split for i, r in recs.items()} == {"a.jpg": "train", "b.jpg": "train", "c.jpg": "dev",
                                                       "d.jpg": "test"}
    assert recs["b.jpg"].captions == ["a cat"] and recs["c.jpg"].captions == ["A bird ."]
    assert recs["a.jpg"].path == tmp_path / "Flicker8k_Dataset" / "a.jpg" and recs["d.jpg"].path is None
    problems = "\n".join(out.problems)
    assert "images[3].sentences[1]: no 'raw' text" in problems
    assert "images[4]: unknown split 'holdout'" in problems
    assert "images[5]: expected 'filename'" in problems


def test_karpathy_coco_ids_are_relative_paths(tmp_path):
    images = [{"filepath": "val2014", "filename": "x.jpg", "split": "val", "sentences": [{"raw": "A cat ."}]}]
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy(images)))
    make_images(tmp_path / "val2014", ["x.jpg"])
    out = read_dataset(tmp_path)
    assert out.records[0].image_id == "val2014/x.jpg"
    assert out.records[0].path == tmp_path / "val2014" / "x.jpg"


@pytest.mark.parametrize("content, message", [
    ('{"annotations": []}', "not a Karpathy split file"),
    ("[1, 2]", "not a Karpathy split file"),
    ("{broken", "dataset_flickr8k.json:1: not valid JSON"),
])
def test_json_that_is_not_karpathy(tmp_path, content, message):
    (tmp_path / "dataset_flickr8k.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_dataset(tmp_path)


def test_custom_csv_with_split_column(tmp_path):
    make_images(tmp_path / "images", ["a.jpg"])
    (tmp_path / "caps.csv").write_text("Image,Caption,Split\na.jpg,A dog .,train\na.jpg,A hound .,train\n"
                                       "b.jpg,A cat .,val\nc.jpg,A cow .,holdout\n,no image,train\n")
    out = read_dataset(tmp_path / "caps.csv")
    recs = by_id(out)
    assert out.layout == "csv"
    assert recs["a.jpg"].captions == ["A dog .", "A hound ."]
    assert recs["a.jpg"].path == tmp_path / "images" / "a.jpg"
    assert recs["b.jpg"].split == "dev" and recs["b.jpg"].path is None
    assert "c.jpg" not in recs
    assert any(f"{tmp_path / 'caps.csv'}:5: unknown split 'holdout'" in p for p in out.problems)
    assert any(f"{tmp_path / 'caps.csv'}:6: needs an 'image'" in p for p in out.problems)
    assert read_dataset(tmp_path).layout == "csv"  # the folder holding one csv works too


def test_custom_csv_without_split_is_seeded_and_deterministic(tmp_path):
    rows = ["image,caption"] + [f"img{i}.png,caption {i}" for i in range(50) for _ in range(2)]
    (tmp_path / "c.csv").write_text("\n".join(rows))
    a = {r.image_id: r.split for r in read_dataset(tmp_path / "c.csv", seed=1).records}
    b = {r.image_id: r.split for r in read_dataset(tmp_path / "c.csv", seed=1).records}
    c = {r.image_id: r.split for r in read_dataset(tmp_path / "c.csv", seed=2).records}
    assert a == b and a != c
    assert [list(a.values()).count(s) for s in ("train", "dev", "test")] == [40, 5, 5]


def test_custom_jsonl(tmp_path):
    make_images(tmp_path, ["a.jpg"])
    lines = [json.dumps({"image": "a.jpg", "caption": "A dog .", "split": "test"}),
             json.dumps({"image": str(tmp_path / "a.jpg"), "captions": ["One .", "Two ."]}),
             "{not json", json.dumps(["list"]), ""]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    out = read_dataset(tmp_path / "data.jsonl")
    recs = by_id(out)
    assert out.layout == "jsonl"
    assert recs["a.jpg"].split == "test" and recs["a.jpg"].path == tmp_path / "a.jpg"
    assert recs[str(tmp_path / "a.jpg")].captions == ["One .", "Two ."]
    assert recs[str(tmp_path / "a.jpg")].path == tmp_path / "a.jpg"
    assert any(f"{tmp_path / 'data.jsonl'}:3: not valid JSON" in p for p in out.problems)
    assert any(f"{tmp_path / 'data.jsonl'}:4: needs an 'image'" in p for p in out.problems)


def test_unrecognised_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for name in ("Flickr8k.token.txt", "dataset_flickr8k.json", "captions.txt", ".csv/.jsonl"):
        assert name in msg
    with pytest.raises(ValueError, match="no such file or folder"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a dataset file"):
        read_dataset(tmp_path / "notes.txt")


def test_csv_without_required_columns(tmp_path):
    (tmp_path / "x.csv").write_text("file,text\na.jpg,hi\n")
    with pytest.raises(ValueError, match=r"x.csv:1: expected a header with 'image' and 'caption'"):
        read_dataset(tmp_path / "x.csv")


def test_real_flickr8k_reads_official_splits(flickr8k_root):
    out = read_dataset(flickr8k_root)
    assert out.layout == "flickr8k"
    counts = {s: sum(r.split == s for r in out.records) for s in ("train", "dev", "test")}
    assert counts == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(r.path is None for r in out.split("test"))
    assert all(r.path is not None and r.path.is_file() for r in out.split("dev")[:50])
    assert out.counts["bogus_names"] == 5 and out.counts["unsplit"] == 91
    assert "2258277193_586949ec62.jpg.1" not in {r.image_id for r in out.records}


def test_real_flickr8k_in_kaggle_layout_matches_original(flickr8k_root, tmp_path):
    (tmp_path / "captions.txt").symlink_to(flickr8k_root / "text" / "captions.txt")
    (tmp_path / "Images").symlink_to(flickr8k_root / "images")
    kaggle, original = read_dataset(tmp_path), read_dataset(flickr8k_root)
    assert kaggle.layout == "kaggle"
    assert {r.image_id: (r.split, r.captions) for r in kaggle.records} == \
           {r.image_id: (r.split, r.captions) for r in original.records}
    assert sum(r.path is not None for r in kaggle.records) == 7000
