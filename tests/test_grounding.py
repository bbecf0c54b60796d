"""Grounded decoding, honest confidence and the heads in the checkpoint (grounding.py)."""
import numpy as np
import pytest
import torch

from captioner.apps.api import Captioner
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.data.objects import object_classes
from captioner.decode import decode
from captioner.grounding import CLASSES, Grounding, GroundingSettings, evidence_labels, train_evidence


def _heads(**settings) -> Grounding:
    g = Grounding(settings=GroundingSettings(**settings))
    g.learnt[:] = True
    return g.eval()


def _evidence(**classes) -> torch.Tensor:
    e = torch.full((len(CLASSES),), 0.5)
    for c, p in classes.items():
        e[CLASSES.index(c.replace("_", " "))] = p
    return e


def _concepts(g: Grounding, **words) -> torch.Tensor:
    c = torch.zeros(len(g.words))
    for w, p in words.items():
        c[g.words.index(w)] = p
    return c


ITOS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "puppy", "man", "cat", "orange", "grass"]


def test_word_bias_bans_unsupported_objects_and_boosts_concepts():
    g = _heads(weight=1.0, ban_below=0.1, boost=2.0)
    ev = _evidence(dog=0.05, person=0.9, cat=0.6).unsqueeze(0)
    bias = g.word_bias(_concepts(g, cat=0.5).unsqueeze(0), ev, ITOS)[0]
    assert torch.isinf(bias[[5, 6, 7]]).all()                     # every dog word
    assert bias[8] == pytest.approx(np.log(0.9))                  # man <- person
    assert bias[9] == pytest.approx(np.log(0.6) + 2.0 * 0.5)      # cat: evidence and the concept's boost
    assert bias[10] == 0 and bias[11] == 0                        # the colour orange and non-objects are free


def test_describe_says_less_when_unsure():
    g = _heads(strict_below=0.7, hedge_below=0.7, add_concepts=0.5)
    no_concepts = _concepts(g)
    sure = g.describe("a dog runs on the grass", no_concepts, _evidence(dog=0.95))
    assert sure["text"] == "a dog runs on the grass" and sure["confidence"] == pytest.approx(0.95)
    # a weak object, and a strict sentence that still names one: the strict sentence is said
    strict = g.describe("a dog runs", no_concepts, _evidence(dog=0.2, person=0.9), strict="a man runs")
    assert strict["text"] == "a man runs" and strict["confidence"] == pytest.approx(0.9)
    # the strict sentence names nothing (it comes out broken): the confident tags instead
    tags = g.describe("a dog runs", _concepts(g, cat=0.9), _evidence(dog=0.2, person=0.1), strict="a black is")
    assert tags["text"] == "Image may contain: cat" and tags["confidence"] == pytest.approx(0.2)  # the sentence's
    assert tags["concepts"][0] == {"word": "cat", "p": 0.9}
    # only a fairly probable ImageNet concept: listed (the evidence head's weak person is not)
    maybe = g.describe("a dog runs", _concepts(g, rocket=0.4), _evidence(dog=0.2, person=0.6))
    assert maybe["text"] == "Image may contain: rocket"
    # nothing probable at all: it says so, or hedges the caption when asked to
    unsure = g.describe("a dog runs", no_concepts, _evidence(dog=0.2, person=0.1))
    assert unsure["text"] == "Not sure what this photo shows" and unsure["confidence"] == pytest.approx(0.2)
    g.settings.unsure_text = ""
    assert g.describe("a dog runs", no_concepts, _evidence(dog=0.2, person=0.1))["text"] == "Probably a dog runs"
    # a confident concept the caption misses is added to it
    added = g.describe("a man sits at a table", _concepts(g, cup=0.9, coffee=0.8),
                       _evidence(person=0.9, dining_table=0.8))
    assert added["text"] == "a man sits at a table with a coffee and a cup"


def test_evidence_head_learns_which_objects_captions_name():
    rng = np.random.default_rng(0)
    n, c = 400, 16
    x = rng.standard_normal((n, 2 * c)).astype(np.float32)
    dog = x[:, 3] > 0.5  # the "dog" feature
    captions = [["a dog runs"] if d else ["a man walks"] for d in dog]
    labels = evidence_labels(captions)
    g = Grounding(channels=c)
    info = train_evidence(g, torch.from_numpy(x), labels, epochs=200)
    assert set(info["learnt"]) == {"dog", "person"}
    p = torch.sigmoid(g.evidence(torch.from_numpy(x)))[:, CLASSES.index("dog")].detach().numpy()
    assert p[dog].mean() > p[~dog].mean() + 0.3  # strongly regularised (l2), so never near 0 or 1 here
    assert (p[dog][:, None] > p[~dog][None, :]).mean() > 0.95  # ranks dog photos first (AUC)


def test_grounded_decoding_never_names_a_banned_object(model_path, flickr8k_root):
    ckpt = load_checkpoint(model_path)
    c = Captioner(ckpt, grounded=False)
    names = (flickr8k_root / "text" / "Flickr_8k.devImages.txt").read_text().split()[:40]
    photos = [flickr8k_root / "images" / n for n in names]
    plain = c.caption_batch(photos)
    dog_photos = [p for p, r in zip(photos, plain) if "dog" in object_classes(r.caption)][:6]
    assert dog_photos, "expected dog photos among the first 40 dev images"
    feats = torch.from_numpy(c.encoder.encode_images(dog_photos))
    itos = ckpt.vocab.itos
    bias = torch.zeros(len(dog_photos), len(itos))
    bias[:, [i for i, w in enumerate(itos) if "dog" in object_classes(w)]] = -float("inf")
    for hyps in decode(c.model, ckpt.vocab, feats, beam_size=3, n_best=3, bias=bias):
        for h in hyps:
            assert "dog" not in object_classes(h.text), h.text


def test_heads_travel_in_the_checkpoint_and_old_ones_still_caption(model_path, tmp_path):
    ckpt = load_checkpoint(model_path)
    g = _heads(weight=0.25)
    torch.nn.init.normal_(g.evidence.weight)
    path = tmp_path / "with-heads.safetensors"
    save_checkpoint(path, ckpt.model, ckpt.vocab, ckpt.config, {"name": "t"}, grounding=g)
    back = load_checkpoint(path)
    assert back.grounding.settings.weight == 0.25
    assert torch.equal(back.grounding.evidence.weight, g.evidence.weight)
    assert torch.equal(back.grounding.learnt, g.learnt)

    old = tmp_path / "old.safetensors"
    save_checkpoint(old, ckpt.model, ckpt.vocab, ckpt.config, {"name": "old"})
    plain = Captioner.load(old)
    assert plain.grounding is None and plain.info["grounded"] is False
    r = plain.caption(Path_examples("cat.jpg"))
    assert r.confidence is None and r.concepts == [] and r.text == r.caption and r.caption


def Path_examples(name):
    from pathlib import Path
    return Path(__file__).resolve().parents[1] / "examples" / name


def test_shipped_model_sees_the_cat_and_the_coffee(model_path):
    c = Captioner.load(model_path)
    if c.grounding is None:
        pytest.fail("the shipped model has no grounding heads")
    cat, coffee = c.caption_batch([Path_examples("cat.jpg"), Path_examples("coffee.jpg")])
    assert cat.concepts[0]["word"] == "cat" and "cat" in cat.text
    assert {"coffee", "cup"} <= {t["word"] for t in coffee.concepts if t["p"] >= 0.5}
    assert "dog" not in object_classes(coffee.text)
    for r in (cat, coffee):
        assert 0 <= r.confidence <= 1 and r.to_dict()["text"] == r.text
