"""Feature store: build, resume after a hard crash, read back, refuse the wrong encoder, Dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioner.apps.cli import main as cli_main
from captioner.data.datasets import load_prepared
from captioner.data.vocab import Vocabulary
from captioner.features.encoder import Encoder
from captioner.features.store import FEATURES_FILE, INDEX_FILE, FeatureStore, build_features, store_dir
from captioner.train_data import CaptionDataset, collate_images

pytestmark = pytest.mark.slow  # real weights, real photos


def _make_workdir(root, flickr8k_root, n_images=14):
    """A prepared WORKDIR of n real Flickr8k photos, one absent test image and one broken file."""
    names = sorted(os.listdir(flickr8k_root / "images"))[:n_images]
    root.mkdir(parents=True, exist_ok=True)
    broken = root / "broken.jpg"
    broken.write_text("not a jpeg")
    rows = []
    for k, name in enumerate(names):
        tokens = [["a", "dog", "runs"][: 1 + (k + j) % 3] for j in range(2 + k % 3)]  # ragged on purpose
        rows.append({"image_id": name, "path": str(flickr8k_root / "images" / name),
                     "split": "train" if k % 4 else "dev", "captions": [" ".join(t) for t in tokens],
                     "tokens": tokens})
    rows.insert(5, {"image_id": "broken.jpg", "path": str(broken), "split": "train",
                    "captions": ["a dog"], "tokens": [["a", "dog"]]})
    rows.append({"image_id": "absent.jpg", "path": None, "split": "test", "captions": ["a dog"],
                 "tokens": [["a", "dog"]]})
    (root / "dataset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Vocabulary.build([t for r in rows for t in r["tokens"]], min_count=1).save(root / "vocab.json")
    (root / "summary.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, flickr8k_root):
    wd = _make_workdir(tmp_path_factory.mktemp("store") / "wd", flickr8k_root)
    summary = build_features(wd, batch_size=4, progress=False)
    return wd, summary


def test_build_reports_and_stores_every_good_image(built):
    wd, s = built
    assert s["images"] == 15 and s["missing"] == 1
    assert s["encoded"] == 14 and s["rows"] == 14 and s["skipped_done"] == 0
    assert list(s["failed"]) == ["broken.jpg"] and "not an image" in s["failed"]["broken.jpg"]
    store = FeatureStore.open(wd)
    assert len(store) == 14 and "broken.jpg" not in store and "absent.jpg" not in store
    assert store.failed == s["failed"]
    size = (store.folder / FEATURES_FILE).stat().st_size
    assert size == 14 * 81 * 1280 * 2
    # rows are the encoder's output, in float16, and np.memmap sees the same layout
    enc = Encoder.load("lite2")
    ids = [store.ids[3], store.ids[0], store.ids[11]]
    expected = enc.encode_images([load_prepared(wd).records[0].path.parent / i for i in ids])
    got = store.get(ids)
    assert got.dtype == np.float32 and got.shape == (3, 81, 1280)
    assert np.abs(got - expected).max() <= 6 * 2 ** -10  # float16 rounding of values in [0, 6]
    mm = np.memmap(store.folder / FEATURES_FILE, np.float16, "r", shape=(14, 81, 1280))
    assert np.array_equal(mm[store.row_of(ids[2])].astype(np.float32), got[2])


def test_rerun_does_nothing_and_unknown_ids_are_named(built):
    wd, _ = built
    before = (store_dir(wd, "lite2") / FEATURES_FILE).read_bytes()
    s = build_features(wd, batch_size=4, progress=False)
    assert s["skipped_done"] == 14 and s["encoded"] == 0 and list(s["failed"]) == ["broken.jpg"]
    assert (store_dir(wd, "lite2") / FEATURES_FILE).read_bytes() == before
    with pytest.raises(KeyError, match="nope.jpg"):
        FeatureStore.open(wd).row_of("nope.jpg")


def test_resume_after_hard_kill_is_byte_identical(built, tmp_path, flickr8k_root):
    wd_ref, _ = built
    wd = _make_workdir(tmp_path / "wd", flickr8k_root)
    code = ("import sys; from captioner.features.store import build_features; "
            "build_features(sys.argv[1], batch_size=4, progress=False)")
    env = {**os.environ, "CAPTIONER_TEST_CRASH_AFTER": "2"}  # os._exit after 2 batches, like kill -9
    proc = subprocess.run([sys.executable, "-c", code, str(wd)], env=env, capture_output=True, text=True)
    assert proc.returncode == 99, proc.stderr
    folder = store_dir(wd, "lite2")
    index = json.loads((folder / INDEX_FILE).read_text())
    assert not index["complete"] and len(index["ids"]) == 7  # 2 batches of 4, one broken
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore.open(wd)
    # a kill in the middle of writing leaves rows past the committed ones: more than the rest of the run
    with open(folder / FEATURES_FILE, "ab") as f:
        f.write(b"\x7f" * (81 * 1280 * 2 * 9 + 100))
    s = build_features(wd, batch_size=4, progress=False)
    assert s["skipped_done"] == 7 and s["encoded"] == 7
    ref = store_dir(wd_ref, "lite2")
    assert (folder / FEATURES_FILE).read_bytes() == (ref / FEATURES_FILE).read_bytes()
    assert json.loads((folder / INDEX_FILE).read_text()) == json.loads((ref / INDEX_FILE).read_text())


def test_store_refuses_another_encoder(tmp_path, flickr8k_root):
    wd = _make_workdir(tmp_path / "wd", flickr8k_root, n_images=2)
    build_features(wd, encoder="lite0", backend="torch", batch_size=8, progress=False)
    store = FeatureStore.open(wd)  # the only store
    assert store.spec.name == "lite0" and store.get(store.ids[:1]).shape == (1, 49, 1280)
    msg = "store built with lite0 (7x7x1280), model expects lite2 (9x9x1280)"
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        FeatureStore.open(wd, "lite2")
    with pytest.raises(ValueError, match="model expects lite1"):
        store.check_encoder("lite1")
    with pytest.raises(ValueError, match="no feature store"):
        FeatureStore.open(tmp_path)


def test_caption_dataset_and_collate(built):
    wd, _ = built
    store, data = FeatureStore.open(wd), load_prepared(wd)
    ds = CaptionDataset(store, data, "train", max_len=2)
    expected_ids = [r.image_id for r in data.split("train") if r.image_id in store]
    assert ds.image_ids == expected_ids and "broken.jpg" not in ds.image_ids and len(ds) == 10
    feats, caps = ds[1]
    image_id = ds.image_ids[1]
    assert torch.equal(feats, torch.from_numpy(store.get([image_id])[0]))
    rows = [data.vocab.encode(t, 2) for t in data.tokens[image_id]]
    assert caps.shape == (len(rows), max(map(len, rows)))
    for row, ids in zip(caps.tolist(), rows):
        assert row == ids + [data.vocab.pad_id] * (caps.shape[1] - len(ids))

    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_images)
    batches = list(loader)
    f, c, idx = batches[0]
    k = [ds[i][1].shape[0] for i in range(3)]
    assert f.shape == (3, 81, 1280) and c.shape[0] == sum(k) == idx.shape[0]
    assert idx.tolist() == [b for b, n in enumerate(k) for _ in range(n)]
    assert torch.equal(f[2], ds[2][0])
    assert sum(b[0].shape[0] for b in batches) == len(ds)


def test_cli_features(built, capsys, tmp_path):
    wd, _ = built
    assert cli_main(["features", str(wd), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "14 float32 grids stored" in out and "failed broken.jpg: not an image" in out
    assert cli_main(["features", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset.jsonl: missing" in err
    # --crops N: N stores of cropped copies, the photos' own store untouched; the bad image reported in each
    assert cli_main(["features", str(wd), "--batch-size", "8", "--crops", "2"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0].rpartition("/")[2] for line in out.splitlines() if "grids stored" in line] == \
        ["lite2-crop1", "lite2-crop2"] and out.count("failed broken.jpg: not an image") == 2
    assert not np.array_equal(FeatureStore.open(wd, "lite2", "crop1").get(FeatureStore.open(wd).ids[:1]),
                              FeatureStore.open(wd).get(FeatureStore.open(wd).ids[:1]))
    for bad in (["--crops", "-1"], ["--crops", "1", "--flip"]):
        assert cli_main(["features", str(wd), *bad]) == 2
        assert "--crops takes a number" in capsys.readouterr().err


def test_int8_store_holds_the_int8_encoders_grids_and_evaluate_uses_it(tmp_path, flickr8k_root, built):
    """`captioner features --int8`: the grids of the shipped int8 graph, marked so in the index; resuming with
    the float encoder is refused; evaluate reads the store whose grids match the encoder people get."""
    from captioner.apps.api import Captioner
    from captioner.evaluation.evaluate import decode_split
    wd = _make_workdir(tmp_path / "wd", flickr8k_root, n_images=6)
    summary = build_features(wd, batch_size=4, progress=False, int8=True)
    store = FeatureStore.open(wd)
    assert summary["weights"] == store.weights == "int8"
    int8 = Encoder.load("lite2", backend="onnx", int8=True)
    want = int8.encode_images([flickr8k_root / "images" / i for i in store.ids[:2]]).astype(np.float16)
    assert np.array_equal(store.get(store.ids[:2]), want)
    assert FeatureStore.open(built[0]).weights == "float32"
    with pytest.raises(ValueError, match="store holds int8 grids, asked for float32"):
        (wd / "features" / "lite2" / INDEX_FILE).write_text(
            (wd / "features" / "lite2" / INDEX_FILE).read_text().replace('"complete": true', '"complete": false'))
        build_features(wd, progress=False)
    records = [r for r in load_prepared(built[0]).records if r.image_id in FeatureStore.open(built[0])][:3]
    for int8_on, from_store in ((True, 0), (False, 3)):
        c = Captioner.load(int8=int8_on)
        _, notes, counts = decode_split(c, records, data=built[0], beam_size=1, batch_size=8, progress=False)
        assert counts["features_from_store"] == from_store
        assert any("holds float32 grids" in n for n in notes) == int8_on


def test_float16_rounding_is_numpys_with_and_without_torch(monkeypatch):
    from captioner.features.store import to_float16
    rng = np.random.default_rng(0)
    x = (rng.random((2, 81, 1280)) * 6).astype(np.float32)
    x[0, 0, :6] = [1e-6, 3e-5, 7e-8, 0.0, 65000.0, 6.0004]  # float16 subnormals, zero, near its largest
    want = x.astype(np.float16)
    for torch_installed in (True, False):
        if not torch_installed:
            monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
        got = to_float16(x)
        assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))
        back = to_float16(want, np.float32)
        assert back.dtype == np.float32 and np.array_equal(back, want.astype(np.float32))
