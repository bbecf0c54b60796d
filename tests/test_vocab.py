import json

import pytest

from captioner.data.vocab import Vocabulary

CAPTIONS = [["a", "dog", "runs"], ["a", "dog", "sits"], ["a", "cat", "sits"], ["a", "cat"]]


def test_specials_have_fixed_ids():
    v = Vocabulary.build([])
    assert v.itos == ["<pad>", "<start>", "<end>", "<unk>"]
    for word, i in [(v.PAD, v.pad_id), (v.START, v.start_id), (v.END, v.end_id), (v.UNK, v.unk_id)]:
        assert v.stoi[word] == i
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)


def test_build_orders_by_count_then_word_and_applies_min_count():
    v = Vocabulary.build(CAPTIONS, min_count=2)
    # a:4, cat:2, dog:2, sits:2 (ties alphabetical); runs:1 dropped
    assert v.itos[4:] == ["a", "cat", "dog", "sits"]
    assert len(v) == 8 and "runs" not in v
    assert Vocabulary.build(CAPTIONS, min_count=1).itos[4:] == ["a", "cat", "dog", "sits", "runs"]
    # input order does not matter
    assert Vocabulary.build(CAPTIONS[::-1], min_count=2) == v


def test_build_ignores_literal_special_tokens():
    v = Vocabulary.build([["<unk>", "<pad>", "x"]] * 5, min_count=1)
    assert v.itos == ["<pad>", "<start>", "<end>", "<unk>", "x"]


def test_encode_decode_round_trip_with_unknowns_and_truncation():
    v = Vocabulary.build(CAPTIONS, min_count=2)
    ids = v.encode(["a", "dog", "runs"])
    assert ids == [v.start_id, v.stoi["a"], v.stoi["dog"], v.unk_id, v.end_id]
    assert v.decode(ids) == ["a", "dog", "<unk>"]
    assert v.encode(["a", "cat", "sits"], max_len=2) == [1, v.stoi["a"], v.stoi["cat"], 2]
    assert v.encode([], max_len=3) == [1, 2]
    # decode stops at the first end and skips start/pad
    assert v.decode([1, v.stoi["cat"], 0, v.stoi["sits"], 2, v.stoi["dog"], 0, 0]) == ["cat", "sits"]


def test_unk_rate():
    v = Vocabulary.build(CAPTIONS, min_count=2)
    assert v.unk_rate(CAPTIONS) == pytest.approx(1 / 11)
    assert v.unk_rate([["zebra", "a"]]) == 0.5
    assert v.unk_rate([]) == 0.0


def test_save_load_round_trip(tmp_path):
    v = Vocabulary.build(CAPTIONS, min_count=1)
    v.save(tmp_path / "vocab.json")
    w = Vocabulary.load(tmp_path / "vocab.json")
    assert w == v and w.stoi == v.stoi
    assert Vocabulary.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json: not a vocabulary file"):
        Vocabulary.load(bad)
    bad.write_text('{"itos": ["a", "b"]}')
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.load(bad)
    with pytest.raises(ValueError, match="not a vocabulary file"):
        Vocabulary.load(tmp_path / "missing.json")
