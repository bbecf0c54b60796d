"""What to say about a photo, from what the grounding heads (grounding.py) saw: which object words decoding may
use, the confidence of a sentence, and the text a person hears or reads.

These are decisions on small numpy arrays, kept free of torch so that the torch-free install (runtime.py:
onnxruntime, numpy and Pillow only) says exactly what the torch path says. The heads give, per photo:
- concepts (W,): probabilities of plain words from EfficientNet-Lite2's ImageNet classifier (cat, coffee, ...);
- evidence (len(CLASSES),): P(the photo shows COCO class c), the larger of the caption-trained head and the
  concepts of that class;
- familiarity (): cosine similarity of the photo's pooled grid to the nearest Flickr8k training centroid.

Decoding adds `weight * log(evidence)` to the log-probability of every word of class c (data/objects.py: man, boy,
woman -> person) and forbids the classes with too little evidence, so the decoder stops naming objects nothing
supports (a "dog" in a kitchen). How little is too little depends on how familiar the photo is: the evidence head
learnt from Flickr8k, and on photos unlike any of its training photos (a plate of food, a kitchen) its "person" and
"dog" are guesses, so there an object needs more evidence (`ban_unfamiliar`). A photo is familiar when it is close
to the Flickr8k training photos and ImageNet does not recognise an object as its subject (a close-up of a cat or a
cup of coffee is not a Flickr8k scene, however its colours and layout look). A caption's confidence is the
evidence of the least supported object it names; below `hedge_below` it is said with less certainty.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from captioner.beam import BAD_ENDINGS, COLOURS
from captioner.data.objects import COCO_OBJECTS, WORD_TO_OBJECT, object_classes

CONCEPTS_FILE = Path(__file__).resolve().parent / "data" / "imagenet_concepts.json"
CLASSES = list(COCO_OBJECTS)  # evidence head outputs, in this order
DOG = CLASSES.index("dog")
# the plain word for a class where its COCO name is not what people say
CLASS_WORD = {"dining table": "table", "sports ball": "ball", "cell phone": "phone", "potted plant": "plant",
              "hair drier": "hair dryer", "tv": "television", "baseball glove": "glove", "wine glass": "glass"}
# GroundingSettings.concept_presence of the shipped model, whose checkpoint predates the setting: what
# grounding.fit_grounding gives on work/flickr8k (`captioner prepare` + `captioner features`)
DEFAULT_PRESENCE = ((0.15, 0.281), (0.25, 0.477), (0.35, 0.603), (0.45, 0.805), (0.55, 0.895), (0.65, 0.95), (0.75, 0.962))


@dataclass
class GroundingSettings:
    """How strongly decoding follows the evidence; saved with the heads in the checkpoint."""
    # chosen on the Flickr8k dev split and ../shared/coco-ood-dev (benchmarks/truthfulness.py)
    weight: float = 0.5         # log-evidence added to an object word's log-probability
    ban_below: float = 0.25     # on a familiar photo, an object with less evidence cannot be named at all
    ban_unfamiliar: float = 0.6  # the same on an unfamiliar photo (familiarity under familiar_above)
    # classes that need more evidence than ban_below even on familiar photos: a third of Flickr8k's photos show a
    # dog, so its head sees one in anything dog-coloured (examples/rocket.jpg: 0.43), while real dogs score > 0.75
    # "person" too: Flickr8k's head sees people in fountains and fairground rides (coco-ood-dev: a false person in 11
    # of 100 captions at 0.25, 6 at 0.4; object recall 50.3 -> 49.7%)
    ban_class: dict = field(default_factory=lambda: {"dog": 0.5, "person": 0.4})
    familiar_above: float = 0.34  # cosine similarity to the nearest Flickr8k training centroid
    object_photo_above: float = 0.6  # a concept this probable (other than Flickr8k's own dogs) makes a photo unfamiliar
    boost: float = 1.0          # added to a concept word's log-probability, times its probability
    add_concepts: float = 0.5   # the most evident object the caption misses, at least this probable, is added to it
    add_unfamiliar: float = 0.5  # the same on an unfamiliar photo (0.3 before the region windows did that job)
    # an object that wins a window of the photo this probably (grounding.Grounding.regions) is added too; on a
    # familiar photo only the classes the evidence head did not learn: for the others, what Flickr8k's captions
    # say of such photos is the better guide (its "bicycle" and "skis" in regions are mostly unmentioned there)
    add_regions: float = 0.4
    add_most: int = 1           # objects added to one caption at most
    hedge_below: float = 0.4    # a caption whose confidence is lower is said as "Probably ..."
    say_less_below: float = 0.1  # tags under this probability are not reported
    # multiplies the odds of "person": a label-shift correction (Saerens et al. 2002) from Flickr8k, where 77% of the
    # train photos have a person in their captions, to everyday photos, about half (coco-ood-dev: 49%); set by
    # fit_grounding from the train labels
    person_odds: float = 1.0
    maybe_above: float = 0.3    # a sentence that names nothing: instead, the concepts over this are listed
    # how often a concept word's class is in the photo, by the word's probability: knots [probability, share] of a
    # rising curve, measured on the training photos by grounding.fit_grounding (there = some caption names it).
    # ImageNet's softmax spreads a photo over sibling classes and over its other objects, so a word at 0.35 is
    # there 6 times in 10 (Flickr8k train). A description made of concepts alone has this as its confidence.
    concept_presence: list = field(default_factory=lambda: [list(k) for k in DEFAULT_PRESENCE])
    unsure_text: str = "Not sure what this photo shows"  # ... and with no such concept, this is said

    @classmethod
    def from_dict(cls, d: dict) -> "GroundingSettings":
        """Settings saved in a checkpoint; keys of earlier versions that no longer apply are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def concept_table(path: Path = CONCEPTS_FILE) -> tuple[list[str], np.ndarray]:
    """(words, M) with M (1000, W) 0/1: which ImageNet classes say each word."""
    classes = json.loads(path.read_text())["classes"]
    words = sorted({w for c in classes for w in c["words"]})
    index = {w: i for i, w in enumerate(words)}
    m = np.zeros((len(classes), len(words)), np.float32)
    for k, c in enumerate(classes):
        for w in c["words"]:
            m[k, index[w]] = 1.0
    return words, m


def concept_classes(words: list[str]) -> np.ndarray:
    """Concept word -> evidence class index (cat -> cat, puppy -> dog, taxi -> car), -1 when none."""
    return np.array([CLASSES.index(WORD_TO_OBJECT[w]) if w in WORD_TO_OBJECT else -1 for w in words])


class Describer:
    """The decisions, for one model: its concept words and the classes its evidence head learnt."""

    def __init__(self, settings: GroundingSettings, learnt, words: list[str] | None = None):
        self.settings = settings
        self.words = words if words is not None else concept_table()[0]
        self.learnt = np.asarray(learnt, dtype=bool)  # (len(CLASSES),)
        self.class_of_word = concept_classes(self.words)
        self._maps: dict = {}  # vocabulary -> index arrays (_vocab_maps)

    def familiar(self, concepts: np.ndarray, familiarity: np.ndarray) -> np.ndarray:
        """(B,) True where the photo looks like Flickr8k's: close to its training photos and no object close-up."""
        s = self.settings
        subjects = self.class_of_word != DOG  # ImageNet's dog breeds are Flickr8k's own subject
        return (familiarity >= s.familiar_above) & ~((concepts[:, subjects]) >= s.object_photo_above).any(1)

    def _vocab_maps(self, itos: list[str]):
        """(object word ids, their class indices, concept word ids, their concept indices) for a vocabulary;
        computed once per vocabulary, as decoding asks for every batch."""
        key = id(itos)
        if key not in self._maps or self._maps[key][0] is not itos:
            pairs = [(i, CLASSES.index(WORD_TO_OBJECT[w])) for i, w in enumerate(itos)
                     if w in WORD_TO_OBJECT and w != "orange"]  # the colour stays sayable
            ids = {w: i for i, w in enumerate(itos)}
            concept = [(ids[w], k) for k, w in enumerate(self.words) if w in ids]
            as_arrays = lambda p: tuple(np.array(c, dtype=np.int64) for c in zip(*p)) if p else (
                np.zeros(0, dtype=np.int64),) * 2
            self._maps[key] = (itos, *as_arrays(pairs), *as_arrays(concept))
        return self._maps[key][1:]

    def word_bias(self, concepts, evidence, familiar, itos: list[str]) -> np.ndarray:
        """(B, V) float32 additive log-probability bias for decoding; objects with less evidence than
        `ban_below` (`ban_unfamiliar` where `familiar` (B,) is False) cannot be named."""
        s = self.settings
        cols, cls, concept_cols, concept_idx = self._vocab_maps(itos)
        bias = np.zeros((len(evidence), len(itos)), np.float32)
        e = np.asarray(evidence, np.float32)[:, cls]
        floor = np.array([s.ban_class.get(c, 0.0) for c in CLASSES], np.float32)[cls]
        ban = e < np.maximum(np.where(familiar, s.ban_below, s.ban_unfamiliar)[:, None], floor)
        with np.errstate(divide="ignore"):
            bias[:, cols] = np.where(ban, -np.inf, s.weight * np.log(np.maximum(e, 1e-6)))
        bias[:, concept_cols] += s.boost * np.asarray(concepts, np.float32)[:, concept_idx]
        return bias

    def confidence(self, caption: str, evidence) -> float:
        """The evidence of the least supported object the caption names; when it names none, that of the most
        evident class the head learnt (a sentence about nothing recognisable is no more certain than that)."""
        named = [float(evidence[CLASSES.index(c)]) for c in object_classes(caption)]
        if named:
            return min(named)
        return float(np.asarray(evidence)[self.learnt].max()) if self.learnt.any() else 0.0

    def presence(self, p: float) -> float:
        """A concept word's probability as the share of photos with such a probability that show it (none
        measured: the probability itself)."""
        if not self.settings.concept_presence:
            return float(p)
        knots = np.asarray([[0.0, 0.0], *self.settings.concept_presence], np.float64)
        return float(np.interp(p, knots[:, 0], knots[:, 1]))

    def seen(self, regions, familiar: bool) -> np.ndarray:
        """(len(CLASSES),) the region probabilities the decisions may use (see `add_regions`); zeros without them
        (models exported before the region head)."""
        if regions is None:
            return np.zeros(len(CLASSES), np.float32)
        return np.asarray(regions, np.float32) * (~self.learnt if familiar else 1)

    def tags(self, concepts, evidence, at_least: float, seen=None) -> list[tuple[str, float]]:
        """What the photo evidently shows, most probable first: ImageNet concept words and the evidence head's
        classes (person, ...) at `at_least` or more, and the region classes `seen` that may be said."""
        concepts = np.asarray(concepts)
        tags = {self.words[k]: float(concepts[k]) for k in np.flatnonzero(concepts >= at_least)}
        for i, c in enumerate(CLASSES):
            if self.learnt[i] and evidence[i] >= at_least and c not in tags:
                tags[c] = float(evidence[i])
            if seen is not None and seen[i] >= max(at_least, self.settings.add_regions):
                tags[c] = max(tags.get(c, 0.0), float(seen[i]))
        return sorted(tags.items(), key=lambda t: -t[1])

    def describe(self, caption: str, concepts, evidence, familiar: bool = True, regions=None) -> dict:
        """One image: the text to say, its confidence and the tags. `caption` is the grounded decoder's sentence,
        `regions` the region head's class probabilities (None for models exported before it).

        - It names an object: said as it is, with the most evident objects it misses added ("... with a cup").
        - It names nothing: every subject it wanted was forbidden, so it comes out broken ("a black and white is
          sitting"); only the ImageNet concepts are said, which are precise where the Flickr8k-trained evidence
          is not: "a picture of a pizza and a table" (a sentence, not a list: it reads and sounds like the
          others; people write "a picture of" six times as often as "a photo of" in the Flickr8k train
          captions), else `unsure_text`.
        Either way "Probably ..." goes before it when its confidence is under `hedge_below`."""
        s = self.settings
        concepts, evidence = np.asarray(concepts), np.asarray(evidence)
        seen = self.seen(regions, familiar)
        support = np.maximum(evidence, seen)  # what backs an object, for its confidence
        tags = self.tags(concepts, evidence, s.say_less_below, seen)
        caption = mended(caption)
        named = object_classes(caption)
        add = s.add_concepts if familiar else s.add_unfamiliar
        missing = [c for _, c in sorted((-p, c) for c, p, e, r in zip(CLASSES, support.tolist(), evidence.tolist(),
                                                                    seen.tolist())
                                        if (e >= add or r >= s.add_regions) and c != "person")]
        if not named:
            sure = sorted(((w, p) for w, p in zip(self.words, concepts.tolist()) if p >= s.maybe_above),
                          key=lambda t: -t[1])[:3]
            said = object_classes(" ".join(w for w, _ in sure))
            words = [w for w, _ in sure] + [c for c in missing if seen[CLASSES.index(c)] >= s.add_regions
                                            and c not in said][:s.add_most]
            text = "a picture of " + " and ".join(_article(CLASS_WORD.get(w, w)) for w in words) if words \
                else s.unsure_text
            if DISHES.intersection(words) and not {"table", "dining table"}.intersection(words):
                text += " on a table"
            confidence = max([self.presence(p) for _, p in sure] + [float(seen[CLASSES.index(w)])
                                                                     for w in words[len(sure):]],
                             default=0.0)
        else:
            also = [c for c in missing if c not in named][:s.add_most]
            text = caption + (" with " + " and ".join(_article(CLASS_WORD.get(c, c)) for c in also) if also else "")
            confidence = self.confidence(text, support)
        if confidence < s.hedge_below and text != s.unsure_text:
            text = "Probably " + text
        return {"text": text, "confidence": round(confidence, 4),
                "concepts": [{"word": w, "p": round(p, 4)} for w, p in tags]}


# concept words of ImageNet's prepared-food classes: a dish photographed close is served on a table that neither
# head sees (ImageNet's "dining table" is a laid-table scene), and a photo of a dish is said as one on a table
# (coco-ood-dev: 5 such photos, the table named by 2+ references in 4, by 1 in the fifth)
DISHES = frozenset("food plate soup cake bread bagel pretzel burger sandwich potato pasta meat pizza pie".split()
                   + ["hot dog"])
# Things people hold or wear, which nobody sits, stands or lies on: each is said 20 times or more in the 29,983
# Flickr8k train captions, and after "sitting / standing / lying ... on" at most once (tests/test_grounding.py
# counts it). Where no noun it knows can be sat on, the decoder still says the posture it learnt for people
# ("a man is sitting on a video camera", examples/camera.jpg); the sentence says what is evident instead: "a man
# with a video camera".
HELD = frozenset("camera hat helmet shirt dress suit sunglasses jeans cap backpack guitar bag sweater cellphone "
                 "phone umbrella bat mask skirt book glass bottle cup racket balloon purse tie violin cigarette "
                 "microphone kite".split())
POSTURES = frozenset("sitting standing lying laying kneeling sits stands lies lays kneels".split())
# words that link a noun phrase to the next: a modifier is none of them, an unfinished phrase ends on one
_LINKS = "in|on|with|at|of|near|for|to|by|from|is|are"
# up to three modifiers between the article and the noun ("a red and white umbrella"), none that starts another phrase
_MODIFIER = r"(?!(?:a|an|the|while|%s)\b)\w+ " % _LINKS
_HELD_SUPPORT = re.compile(r"(?:\b(?:is|are) )?\b(?:%s) on (?=(?:(?:a|an|the|his|her|their) )?(?:%s){0,3}(?:%s)\b)"
                           % ("|".join(sorted(POSTURES)), _MODIFIER, "|".join(sorted(HELD))))
# A noun phrase the decoder opened and could not finish, where grounding forbade the noun it wanted: "holding a red
# in a", "sitting on a blue and a screen" (2 of 1,000 Flickr8k dev and 2 of 100 coco-ood-dev sentences that name
# something, beam 3). The sentence is said up to the last thing it could name.
_COLOUR = "(?:%s)" % "|".join(sorted(COLOURS))
_UNFINISHED = re.compile(r"\b(?:a|an|the) %s(?: (?:and )?%s)* (?:%s|and (?:a|an|the))\b"
                         % (_COLOUR, _COLOUR, _LINKS))


def mended(caption: str) -> str:
    """The decoder's sentence with what it cannot mean taken out: a held thing is not a seat ("a man is sitting
    on a video camera" -> "a man with a video camera"), an unfinished noun phrase is not said ("a young boy in a
    red helmet is holding a red in a black uniform" -> "a young boy in a red helmet"; "" when nothing is left)."""
    caption = _HELD_SUPPORT.sub("with ", caption)
    broken = _UNFINISHED.search(caption)
    if broken is None:
        return caption
    words = caption[:broken.start()].split()
    while words and words[-1] in BAD_ENDINGS:
        words.pop()
    if len(words) >= 2 and words[-1].endswith("ing") and words[-2] in ("is", "are"):
        del words[-2:]
    return " ".join(words)


# concept and class words said without "a": what is uncounted, and what comes in pairs or piles
MASS_NOUNS = frozenset("food coffee meat bread pasta soup cream corn wine beer broccoli cauliflower cabbage coral".split())
PLURALS = frozenset("books skis sunglasses binoculars scissors".split())


def _article(word: str) -> str:
    if word in MASS_NOUNS or word in PLURALS:
        return word
    return ("an " if word[0] in "aeiou" else "a ") + word
