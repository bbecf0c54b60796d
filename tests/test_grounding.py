"""Grounded decoding, honest confidence and the heads in the checkpoint (grounding.py)."""
import numpy as np
import pytest
import torch

from captioner.apps.api import Captioner
from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.data.objects import object_classes
from captioner.decode import decode
from captioner.describe import Describer
from captioner.grounding import (CLASSES, Grounding, GroundingSettings, evidence_labels, fit_domain, has_imagenet_grid,
                                 match_classifier, presence_curve, train_evidence)


def _heads(**settings) -> Describer:
    """The decisions (describe.py) for heads that learnt every class."""
    return Describer(GroundingSettings(**settings), [True] * len(CLASSES))


def _evidence(**classes) -> np.ndarray:
    e = np.full(len(CLASSES), 0.05, np.float32)
    for c, p in classes.items():
        e[CLASSES.index(c.replace("_", " "))] = p
    return e


def _concepts(g: Describer, **words) -> np.ndarray:
    c = np.zeros(len(g.words), np.float32)
    for w, p in words.items():
        c[g.words.index(w)] = p
    return c


def _rows(x: np.ndarray, n: int = 2) -> np.ndarray:
    return np.repeat(x[None], n, 0)


ITOS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "dogs", "puppy", "man", "cat", "orange", "grass"]


def test_word_bias_bans_unsupported_objects_and_boosts_concepts():
    g = _heads(weight=1.0, ban_below=0.1, ban_unfamiliar=0.7, familiar_above=0.5, boost=2.0)
    ev = _rows(_evidence(dog=0.05, person=0.6, cat=0.8))
    familiar = np.array([True, False])
    bias = g.word_bias(_rows(_concepts(g, cat=0.5)), ev, familiar, ITOS)
    assert np.isneginf(bias[:, [5, 6, 7]]).all()                  # every dog word, on both photos
    assert bias[0, 8] == pytest.approx(np.log(0.6))               # man <- person, named on the familiar photo
    assert np.isneginf(bias[1, 8])                                # ... but 0.6 is too little on the unfamiliar one
    assert bias[1, 9] == pytest.approx(np.log(0.8) + 2.0 * 0.5)   # cat: evidence and the concept's boost
    g.settings.ban_class = {"person": 0.65}                      # a class that needs more, even on familiar photos
    assert np.isneginf(g.word_bias(_rows(_concepts(g)), ev, familiar, ITOS)[0, 8])
    assert (bias[:, [10, 11]] == 0).all()                         # the colour orange and non-objects are free


def test_familiarity_is_high_on_training_like_grids_and_low_elsewhere():
    g = Grounding(channels=8, centroids=4)
    rng = torch.Generator().manual_seed(0)
    train = torch.cat([torch.randn(50, 16, generator=rng) * 0.1 + torch.eye(16)[i] * 3 for i in range(4)])
    fit_domain(g, train)
    near = g.familiarity(torch.eye(16)[:4] * 3)  # one photo like each cluster
    far = g.familiarity(torch.eye(16)[4:8] * 3)  # like none of them
    assert (near > 0.9).all() and (far < 0.5).all()
    assert torch.equal(Grounding(channels=8).familiarity(train[:3]), torch.ones(3))  # no centroids: familiar


def test_an_object_close_up_is_unfamiliar_but_a_dog_is_not():
    g = _heads(familiar_above=0.5, object_photo_above=0.6)
    concepts = np.stack([_concepts(g), _concepts(g, cat=0.9), _concepts(g, dog=0.9), _concepts(g)])
    familiarity = np.array([0.9, 0.9, 0.9, 0.3])
    assert g.familiar(concepts, familiarity).tolist() == [True, False, True, False]


def test_describe_says_less_when_unsure():
    # concept probabilities taken as they are (test_concepts_alone_are_as_sure_as_such_concepts_are_right: the curve)
    g = _heads(hedge_below=0.5, add_concepts=0.5, familiar_above=0.5, maybe_above=0.3, concept_presence=[])
    none = _concepts(g)
    sure = g.describe("a dog runs on the grass", none, _evidence(dog=0.95))
    assert sure["text"] == "a dog runs on the grass" and sure["confidence"] == pytest.approx(0.95)
    # a weakly backed object: said with less certainty
    weak = g.describe("a dog runs", none, _evidence(dog=0.3, person=0.9))
    assert weak["text"] == "Probably a dog runs" and weak["confidence"] == pytest.approx(0.3)
    # a sentence naming nothing on an unfamiliar photo (its subjects were forbidden): the ImageNet concepts
    tags = g.describe("a black and white is sitting", _concepts(g, cat=0.9, rocket=0.2), _evidence())
    assert tags["text"] == "a picture of a cat" and tags["confidence"] == pytest.approx(0.9)
    assert tags["concepts"][0] == {"word": "cat", "p": 0.9}
    # several, most probable first, each with its article (none for what is uncounted or plural); weakly: hedged
    food = g.describe("a black and white is sitting", _concepts(g, apple=0.8, coffee=0.6, skis=0.5), _evidence())
    assert food["text"] == "a picture of an apple and coffee and skis"
    weak = g.describe("a black and white is sitting", _concepts(g, bus=0.35), _evidence())
    assert weak["text"] == "Probably a picture of a bus" and weak["confidence"] == pytest.approx(0.35)
    # ... and with no probable concept, it says it is unsure
    unsure = g.describe("a black and white is sitting", none, _evidence())
    assert unsure["text"] == "Not sure what this photo shows" and unsure["confidence"] == 0
    # a sentence that names no object is as sure as the most evident class the head learnt
    assert g.confidence("a street at night", _evidence(car=0.3)) == pytest.approx(0.3)
    # the most evident object the caption misses is added to it, under its plain word
    added = g.describe("a man sits in a room", _concepts(g, cup=0.9), _evidence(person=0.9, cup=0.9, dining_table=0.8))
    assert added["text"] == "a man sits in a room with a cup"
    table = g.describe("a man sits", none, _evidence(person=0.9, dining_table=0.8))
    assert table["text"] == "a man sits with a table" and table["confidence"] == pytest.approx(0.8)


def test_concepts_alone_are_as_sure_as_such_concepts_are_right():
    # training photos: a concept at 0.15 whose class the captions name 1 time in 4, at 0.35 3 in 4, at 0.55 2 in 4
    # (fewer than at 0.35: the curve only rises), at 0.95 in 1 photo (too few to count)
    words = ["cat", "bus", "pizza"]
    class_of_word = np.array([CLASSES.index("cat"), CLASSES.index("bus"), -1])  # pizza: no class in this test
    concepts = np.zeros((13, 3), np.float32)
    labels = np.zeros((13, len(CLASSES)), np.float32)
    concepts[:4, 0], labels[:1, CLASSES.index("cat")] = 0.15, 1
    concepts[4:8, 1], labels[4:7, CLASSES.index("bus")] = 0.35, 1
    concepts[8:12, 0], labels[8:10, CLASSES.index("cat")] = 0.55, 1
    concepts[12, 0], concepts[:, 2], labels[:, CLASSES.index("pizza")] = 0.95, 0.9, 1
    curve = presence_curve(concepts, labels, class_of_word, min_photos=2)
    assert curve == [[0.15, 0.25], [0.35, 0.75]]  # 0.55 cut: the top was reached at 0.35
    g = Describer(GroundingSettings(concept_presence=curve, maybe_above=0.2, hedge_below=0.4), [True] * len(CLASSES),
                  words)
    said = g.describe("a black and white", np.array([0.0, 0.2, 0.0]), _evidence())
    assert said["text"] == "Probably a picture of a bus" and said["confidence"] == pytest.approx(0.375)  # between knots
    # a bus at 0.32 is there more often than 0.32: said without "Probably"; the tags keep the classifier's figure
    said = g.describe("a black and white", np.array([0.0, 0.32, 0.0]), _evidence())
    assert said["text"] == "a picture of a bus" and said["confidence"] == pytest.approx(0.25 + 0.85 * 0.5)
    assert said["concepts"][0] == {"word": "bus", "p": pytest.approx(0.32)}
    assert g.describe("a black and white", np.array([0.99, 0.0, 0.0]), _evidence())["confidence"] == 0.75
    assert g.presence(0.075) == pytest.approx(0.125)  # under the first knot: towards nothing at 0
    # sentences that name an object keep the object's evidence as their confidence
    assert g.describe("a bus", np.array([0.0, 0.32, 0.0]), _evidence(bus=0.32))["confidence"] == pytest.approx(0.32)


def test_objects_that_win_a_window_are_added_where_flickr8k_cannot_judge_them():
    learnt = np.ones(len(CLASSES), bool)
    learnt[CLASSES.index("zebra")] = False  # Flickr8k's captions never taught the evidence head zebras
    g = Describer(GroundingSettings(add_regions=0.4, add_concepts=0.5, add_unfamiliar=0.3, add_most=1), learnt)
    none = _concepts(g)
    regions = np.zeros(len(CLASSES), np.float32)
    regions[[CLASSES.index("zebra"), CLASSES.index("bicycle")]] = [0.6, 0.7]
    ev = _evidence(person=0.9, bicycle=0.1)
    # familiar photo: only the class the head did not learn comes from the regions
    assert g.describe("a man stands", none, ev, True, regions)["text"] == "a man stands with a zebra"
    # unfamiliar photo: every class may; the most probable one is said (add_most 1), its support is its confidence
    said = g.describe("a man stands", none, ev, False, regions)
    assert said["text"] == "a man stands with a bicycle" and said["confidence"] == pytest.approx(0.7)
    assert {"word": "bicycle", "p": 0.7} in said["concepts"]
    # under add_regions nothing is added, even where it beats add_unfamiliar (that threshold is the evidence's)
    regions[:] = 0.35
    assert g.describe("a man stands", none, ev, False, regions)["text"] == "a man stands"
    # a sentence naming nothing says the region classes after the concepts; models without regions: unchanged
    regions[:] = 0
    regions[CLASSES.index("dining table")] = 0.5
    assert g.describe("a black and white", _concepts(g, pizza=0.6), _evidence(), False, regions)["text"] == \
        "a picture of a pizza and a table"
    assert g.describe("a black and white", _concepts(g, pizza=0.6), _evidence(), False)["text"] == \
        "a picture of a pizza on a table"


def test_a_dish_photographed_close_is_said_to_be_on_a_table():
    g = _heads(maybe_above=0.3)
    said = lambda **concepts: g.describe("a black and white is sitting", _concepts(g, **concepts), _evidence())["text"]
    assert said(food=0.5, plate=0.4) == "a picture of food and a plate on a table"
    assert said(table=0.5, pizza=0.6) == "a picture of a pizza and a table"  # a table seen is not said twice
    assert said(banana=0.6) == "a picture of a banana"  # fruit is sold and grown, not only served
    # a sentence the decoder could finish is left alone
    assert g.describe("a man is eating", _concepts(g, pizza=0.6), _evidence(person=0.9))["text"] == "a man is eating"


def test_region_probabilities_see_what_the_whole_photo_average_hides():
    g = Grounding(channels=1280)
    torch.nn.init.zeros_(g.imagenet.weight)
    torch.nn.init.zeros_(g.imagenet.bias)
    cls = next(k for k, w in enumerate(g.word_of_class.argmax(1).tolist())
               if g.words[w] == "zebra" and g.word_of_class[k].sum() == 1)
    g.imagenet.weight.data[cls, 0] = 20.0  # channel 0 says "zebra"
    grid = torch.zeros(2, 81, 1280)
    grid[0].view(9, 9, 1280)[:3, :3, 0] = 1.0  # a zebra in the top-left corner: 9 of 81 cells
    grid[1, :, 0] = 1.0                         # zebras everywhere
    with torch.no_grad():
        concepts, _, _, regions = g(grid)
    p = lambda share: np.exp(20 * share) / (np.exp(20 * share) + 999)  # softmax of one logit against 999 zeros
    zebra = CLASSES.index("zebra")
    assert concepts[0, g.words.index("zebra")].item() == pytest.approx(p(9 / 81), rel=1e-4)  # diluted ...
    assert regions[0, zebra].item() == pytest.approx(p(9 / 49), rel=1e-4)  # ... 4x stronger in its 7x7 corner window
    assert regions[1, zebra].item() == pytest.approx(concepts[1, g.words.index("zebra")].item(), rel=1e-5)


def test_classifier_reads_grids_of_another_input_size_like_native_ones():
    assert has_imagenet_grid("lite2") and has_imagenet_grid("lite2@320")
    assert not has_imagenet_grid("lite2-cut2") and not has_imagenet_grid("lite0+lite2")  # not the classifier's input
    g = Grounding()
    torch.manual_seed(0)
    native = torch.randn(300, 1280) * 2 + 1
    other = native * (torch.rand(1280) * 0.5 + 0.5) + torch.randn(1280) * 0.1  # same photos, channels shrunk, moved
    with torch.no_grad():
        want = g.imagenet(native)
        assert (g.imagenet(other) - want).abs().max() > 0.1
        match_classifier(g, native, other)
        assert torch.allclose(g.imagenet(other), want, atol=1e-3)


def test_settings_of_earlier_versions_still_load():
    s = GroundingSettings.from_dict({"weight": 0.3, "strict_below": 0.7})
    assert s.weight == 0.3 and not hasattr(s, "strict_below")


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
    for hyps in decode(c.runtime.model, ckpt.vocab, feats, beam_size=3, n_best=3, bias=bias):
        for h in hyps:
            assert "dog" not in object_classes(h.text), h.text


def test_heads_travel_in_the_checkpoint_and_old_ones_still_caption(model_path, tmp_path):
    ckpt = load_checkpoint(model_path)
    g = Grounding(settings=GroundingSettings(weight=0.25))
    g.learnt[:] = True
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
    assert plain.describer is None and plain.info["grounded"] is False
    r = plain.caption(Path_examples("cat.jpg"))
    assert r.confidence is None and r.concepts == [] and r.text == r.caption and r.caption


def Path_examples(name):
    from pathlib import Path
    return Path(__file__).resolve().parents[1] / "examples" / name


def test_shipped_model_sees_the_cat_and_the_coffee(model_path):
    c = Captioner.load(model_path)
    if c.describer is None:
        pytest.fail("the shipped model has no grounding heads")
    cat, coffee = c.caption_batch([Path_examples("cat.jpg"), Path_examples("coffee.jpg")])
    assert cat.concepts[0]["word"] == "cat" and "cat" in cat.text
    assert {"coffee", "cup"} <= {t["word"] for t in coffee.concepts if t["p"] >= 0.5}
    assert "dog" not in object_classes(coffee.text)
    for r in (cat, coffee):
        assert 0 <= r.confidence <= 1 and r.to_dict()["text"] == r.text


def test_what_the_decoder_cannot_mean_is_not_said(flickr8k_root):
    from captioner.data.text import tokenize
    from captioner.describe import HELD, POSTURES, mended
    g = _heads()
    said = lambda caption: g.describe(caption, _concepts(g), _evidence(person=0.9, umbrella=0.45))["text"]
    assert said("a man is sitting on a video camera") == "a man with a video camera"  # examples/camera.jpg
    assert said("two men are standing on a red and white umbrella in a field") == \
        "two men with a red and white umbrella in a field"
    for fine in ("a man is sitting on a bench with a camera", "a man is standing on a rock", "a man holds a camera",
                 "the dog is white and brown", "a man in a white shirt is sitting on a bench"):
        assert mended(fine) == fine
    # a noun phrase left unfinished (grounding forbade its noun) is not said; the sentence up to it is
    assert said("a young boy in a red helmet is holding a red in a black and white uniform") == \
        "a young boy in a red helmet"
    assert said("a woman is sitting in a white and a white water") == "a woman"
    # nothing left: the photo is said as its concepts
    assert g.describe("a brown and white is sitting in a window", _concepts(g, cup=0.9), _evidence())["text"] == \
        "a picture of a cup"
    # HELD is what the Flickr8k train captions say often and (almost) never sit, stand or lie on
    train = set((flickr8k_root / "text" / "Flickr_8k.trainImages.txt").read_text().split())
    captions = [tokenize(line.split("\t", 1)[1]) for line in
                (flickr8k_root / "text" / "Flickr8k.token.txt").read_text().splitlines()
                if line.split("#", 1)[0] in train]
    said_on = {w: 0 for w in HELD}
    for words in captions:
        for i, w in enumerate(words[1:], 1):
            if w == "on" and words[i - 1] in POSTURES:
                for after in words[i + 1:i + 5]:
                    if after in said_on:
                        said_on[after] += 1
                        break
    mentions = {w: sum(c.count(w) for c in captions) for w in HELD}
    assert min(mentions.values()) >= 20 and max(said_on.values()) <= 1, (mentions, said_on)
