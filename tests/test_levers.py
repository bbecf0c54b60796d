"""Quality levers in training: mirror-image and crop augmentation, fine-tuning the encoder's top blocks."""
import shutil

import numpy as np
import pytest
import torch
from PIL import ImageOps

from captioner.apps.api import Captioner
from captioner.checkpoint import load_checkpoint
from captioner.config import Config
from captioner.data.datasets import load_prepared
from captioner.data.images import load_image, preprocess
from captioner.features.encoder import Encoder
from captioner.features.store import FeatureStore, build_features, view_image
from captioner.train import train
from captioner.train_data import CaptionDataset
from test_train import TINY, _train_cmd, assert_killed_and_resumed_equals_straight


@pytest.fixture(scope="module")
def lever_workdir(tiny_workdir, tmp_path_factory):
    """The tiny dataset with a lite2-cut1 store, the mirror-image stores of lite2 and lite2-cut1 and two crop
    stores of lite2-cut1."""
    work = tmp_path_factory.mktemp("levers") / "work"
    shutil.copytree(tiny_workdir, work)
    for encoder, view in (("lite2", "flip"), ("lite2-cut1", ""), ("lite2-cut1", "flip"), ("lite2-cut1", "crop1"),
                          ("lite2-cut1", "crop2")):
        build_features(work, encoder=encoder, backend="torch", progress=False, view=view)
    return work


def test_mirror_store_holds_the_mirror_images_and_captions_swap_sides(lever_workdir):
    data = load_prepared(lever_workdir)
    plain, mirrored = FeatureStore.open(lever_workdir, "lite2"), FeatureStore.open(lever_workdir, "lite2", "flip")
    assert mirrored.folder.name == "lite2-flip" and mirrored.ids == plain.ids
    record = data.split("train")[0]
    enc = Encoder.load("lite2", backend="torch")
    img = load_image(record.path)
    expected = enc.encode(preprocess(ImageOps.mirror(img), enc.spec)[None])[0]
    assert np.allclose(mirrored.get([record.image_id])[0], expected, atol=2e-2)  # float16 store
    assert np.abs(mirrored.get([record.image_id]) - plain.get([record.image_id])).mean() > 0.01

    data.tokens[record.image_id] = [["a", "dog", "on", "the", "left", "of", "a", "man", "right"]]
    data.vocab = type(data.vocab)(list(data.vocab.itos) + sorted({"left", "right", "man"} - set(data.vocab.itos)))
    never = CaptionDataset(plain, data, "train", mirrored=mirrored, flip_prob=0.0)
    always = CaptionDataset(plain, data, "train", mirrored=mirrored, flip_prob=1.0)
    i = never.image_ids.index(record.image_id)
    (f0, c0), (f1, c1) = never[i], always[i]
    assert torch.equal(f0, torch.from_numpy(plain.get([record.image_id])[0]))
    assert torch.equal(f1, torch.from_numpy(mirrored.get([record.image_id])[0]))
    v = data.vocab
    words = lambda caps: [v.itos[t] for t in caps[0].tolist() if t > 3]  # noqa: E731 (skip specials)
    assert words(c0) == ["a", "dog", "on", "the", "left", "of", "a", "man", "right"]
    assert words(c1) == ["a", "dog", "on", "the", "right", "of", "a", "man", "left"]
    half = CaptionDataset(plain, data, "train", mirrored=mirrored, flip_prob=0.5, seed=3)
    flips = [[half.flipped(j) for j in range(len(half))] for half.epoch in range(4)]
    assert 0 < sum(map(sum, flips)) < 4 * len(half) and flips[0] != flips[1]  # random per epoch, reproducible
    assert flips == [[half.flipped(j) for j in range(len(half))] for half.epoch in range(4)]

    with pytest.raises(ValueError, match="lite0 --flip"):
        FeatureStore.open(lever_workdir, "lite0", "flip")


def test_fine_tuned_top_learns_at_its_own_rate_and_captioner_runs_it(lever_workdir, tmp_path):
    config = Config(**TINY, encoder="lite2-cut1", epochs=2, finetune_lr_scale=0.5, flip_prob=0.5)
    train(lever_workdir, tmp_path / "run", config, progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert ckpt.config.feature_dim == 208 and ckpt.model.project[0].in_features == 1280
    from captioner.model import ShowAttendTell
    fresh = ShowAttendTell(ckpt.config, len(ckpt.vocab)).state_dict()  # the pretrained top
    tuned = ckpt.model.state_dict()
    moved = [k for k in tuned if k.startswith("top.") and not torch.equal(tuned[k], fresh[k])]
    assert any("head" in k for k in moved) and any("blocks" in k for k in moved)
    # BatchNorm statistics stay the ImageNet ones
    assert all(torch.equal(tuned[k], fresh[k]) for k in tuned if k.startswith("top.") and "running" in k)

    # the app runs trunk (ONNX) + the model's top and gets what training saw from the store
    cap = Captioner.load(tmp_path / "run" / "last.safetensors", beam_size=1, int8=False)
    record = load_prepared(lever_workdir).split("train")[0]
    store = FeatureStore.open(lever_workdir, "lite2-cut1")
    from captioner.decode import greedy
    expected = greedy(ckpt.model, ckpt.vocab, torch.from_numpy(store.get([record.image_id])), max_len=30)[0]
    live = cap.encoder.encode_images([record.path])
    assert live.shape == (1, 81, 208) and np.allclose(live, store.get([record.image_id]), atol=2e-2)
    assert cap.caption(record.path).caption == expected.text


def test_crop_stores_hold_reproducible_crops_and_training_draws_from_all(lever_workdir):
    data = load_prepared(lever_workdir)
    record = data.split("train")[0]
    img = load_image(record.path)
    one, again, two = (view_image(img, v, record.image_id) for v in ("crop1", "crop1", "crop2"))
    assert np.array_equal(np.asarray(one), np.asarray(again)) and one.size != two.size  # drawn from (id, view)
    (w, h), (cw, ch) = img.size, one.size
    assert cw <= w and ch <= h and cw * ch >= 0.5 * w * h  # 60-100% of the area, less rounding at the borders
    enc = Encoder.load("lite2-cut1", backend="torch")
    crop1 = FeatureStore.open(lever_workdir, "lite2-cut1", "crop1")
    assert crop1.folder.name == "lite2-cut1-crop1"
    assert np.allclose(crop1.get([record.image_id])[0], enc.encode(preprocess(one, enc.spec)[None])[0], atol=2e-2)

    plain = FeatureStore.open(lever_workdir, "lite2-cut1")
    crops = [crop1, FeatureStore.open(lever_workdir, "lite2-cut1", "crop2")]
    ds = CaptionDataset(plain, data, "train", crops=crops, seed=1)
    drawn = [[ds.source(j).folder.name for j in range(len(ds))] for ds.epoch in range(6)]
    assert {n for epoch in drawn for n in epoch} == {"lite2-cut1", "lite2-cut1-crop1", "lite2-cut1-crop2"}
    again = [[ds.source(j).folder.name for j in range(len(ds))] for ds.epoch in range(6)]
    assert drawn[0] != drawn[1] and drawn == again  # drawn per epoch, reproducibly
    i = ds.image_ids.index(record.image_id)
    ds.epoch = next(e for e in range(6) if drawn[e][i] == "lite2-cut1-crop1")
    assert torch.equal(ds[i][0], torch.from_numpy(crop1.get([record.image_id])[0]))


def test_fine_tuning_with_flips_and_crops_resumes_exactly(lever_workdir, tmp_path):
    assert_killed_and_resumed_equals_straight(tmp_path, lambda out, extra=(): _train_cmd(
        lever_workdir, out, extra, encoder="lite2-cut1", flip_prob=0.5, crop_views=2))


def test_flip_prob_and_crop_views_need_their_stores(tiny_workdir, tmp_path):
    with pytest.raises(ValueError, match="lite2-flip.*--flip"):
        train(tiny_workdir, tmp_path / "run", Config(**TINY, flip_prob=0.5), progress=False)
    with pytest.raises(ValueError, match="lite2-crop1.*--crops 1"):
        train(tiny_workdir, tmp_path / "run2", Config(**TINY, crop_views=1), progress=False)


def test_cli_set_overrides_config_fields(tiny_workdir, tmp_path, capsys):
    from captioner.apps.cli import main
    toml = tmp_path / "c.toml"
    toml.write_text("".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in TINY.items()))
    out = tmp_path / "run"
    assert main(["train", str(tiny_workdir), "--out", str(out), "--config", str(toml), "--epochs", "1",
                 "--set", "decoder_dim=48", "--set", "encoder=lite2", "--set", "flip_prob=0.0"]) == 0
    config = load_checkpoint(out / "last.safetensors").config
    assert (config.decoder_dim, config.embed_dim, config.epochs, config.encoder) == (48, 64, 1, "lite2")
    capsys.readouterr()
    assert main(["train", str(tiny_workdir), "--out", str(tmp_path / "x"), "--set", "decoder_size=1"]) == 2
    assert main(["train", str(tiny_workdir), "--out", str(tmp_path / "y"), "--set", "nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --set: unknown config keys: decoder_size (did you mean decoder_dim?)",
                   "error: --set: expected KEY=VALUE, got 'nothing'"]
