"""Grounding: what the photo evidently shows, so that the caption says no more than that.

Two heads read the encoder's grid (pooled; they cost well under a millisecond on top of the encoder pass):
- concepts: EfficientNet-Lite2's own ImageNet classifier (the layer after the grid in the same network), its
  1,000 classes grouped into plain words (Egyptian cat, tabby -> "cat"; espresso -> "coffee", "cup") by the
  reviewed table data/imagenet_concepts.json. A word's probability is the summed probability of its classes.
- evidence: a multi-label classifier trained on Flickr8k's captions: P(some caption of this photo names
  COCO class c), for the classes Flickr8k mentions often enough to learn (person, dog, bicycle, ...).

The evidence of class c is the larger of the two. Decoding adds `weight * log(evidence)` to the log-probability
of every word of class c (data/objects.py: man, boy, woman -> person) and forbids the classes with too little
evidence, so the decoder stops naming objects nothing supports (a "dog" in a kitchen). How little is too little
depends on how familiar the photo is: the evidence head learnt from Flickr8k, and on photos unlike any of its
training photos (a plate of food, a kitchen) its "person" and "dog" are guesses, so there an object needs more
evidence (`ban_unfamiliar`). A photo is familiar when its pooled grid is close to one of 256 k-means centroids of
the Flickr8k training photos (cosine similarity) and ImageNet does not recognise an object as its subject (a
close-up of a cat or a cup of coffee is not a Flickr8k scene, however its colours and layout look). A caption's
confidence is the evidence of the least supported object it names; below `hedge_below` it is said with less
certainty.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from captioner.data.objects import COCO_OBJECTS, WORD_TO_OBJECT, object_classes

CONCEPTS_FILE = Path(__file__).resolve().parent / "data" / "imagenet_concepts.json"
CLASSES = list(COCO_OBJECTS)  # evidence head outputs, in this order
MIN_POSITIVES = 20  # train images naming a class, below which the evidence head does not learn it
CENTROIDS = 256  # k-means centroids of the training photos' pooled grids, for familiarity
# the plain word for a class where its COCO name is not what people say
CLASS_WORD = {"dining table": "table", "sports ball": "ball", "cell phone": "phone", "potted plant": "plant",
              "hair drier": "hair dryer", "tv": "television", "baseball glove": "glove", "wine glass": "glass"}


@dataclass
class GroundingSettings:
    """How strongly decoding follows the evidence; saved with the heads in the checkpoint."""
    # chosen on the Flickr8k dev split and ../shared/coco-ood-dev (benchmarks/truthfulness.py)
    weight: float = 0.5         # log-evidence added to an object word's log-probability
    ban_below: float = 0.25     # on a familiar photo, an object with less evidence cannot be named at all
    ban_unfamiliar: float = 0.6  # the same on an unfamiliar photo (familiarity under familiar_above)
    # classes that need more evidence than ban_below even on familiar photos: a third of Flickr8k's photos show a
    # dog, so its head sees one in anything dog-coloured (examples/rocket.jpg: 0.43), while real dogs score > 0.75
    ban_class: dict = field(default_factory=lambda: {"dog": 0.5})
    familiar_above: float = 0.38  # cosine similarity to the nearest Flickr8k training centroid
    object_photo_above: float = 0.6  # a concept this probable (other than Flickr8k's own dogs) makes a photo unfamiliar
    boost: float = 1.0          # added to a concept word's log-probability, times its probability
    add_concepts: float = 0.5   # the most evident object the caption misses, at least this probable, is added to it
    hedge_below: float = 0.4    # a caption whose confidence is lower is said as "Probably ..."
    say_less_below: float = 0.1  # tags under this probability are not reported
    # multiplies the odds of "person": a label-shift correction (Saerens et al. 2002) from Flickr8k, where 77% of the
    # train photos have a person in their captions, to everyday photos, about half (coco-ood-dev: 49%); set by
    # fit_grounding from the train labels
    person_odds: float = 1.0
    maybe_above: float = 0.3    # a sentence that names nothing: instead, the concepts over this are listed
    unsure_text: str = "Not sure what this photo shows"  # ... and with no such concept, this is said

    @classmethod
    def from_dict(cls, d: dict) -> "GroundingSettings":
        """Settings saved in a checkpoint; keys of earlier versions that no longer apply are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _pool(grid: torch.Tensor) -> torch.Tensor:
    """(B, R, C) -> (B, 2C): mean and max over regions (the mean is what the ImageNet classifier reads)."""
    return torch.cat([grid.mean(1), grid.amax(1)], 1)


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


class Grounding(nn.Module):
    """Both heads and the familiarity centroids; `forward` gives concept probabilities (B, W), class evidence
    (B, len(CLASSES)) and familiarity (B,)."""

    def __init__(self, channels: int = 1280, settings: GroundingSettings | None = None, centroids: int = 0):
        super().__init__()
        self.settings = settings or GroundingSettings()
        self._maps: dict = {}  # vocabulary -> index tensors (_vocab_maps)
        self.words, m = concept_table()
        self.imagenet = nn.Linear(1280, 1000)  # the encoder's ImageNet classifier, frozen
        # the word table is package data, not weights: it is rebuilt from data/imagenet_concepts.json
        self.register_buffer("word_of_class", torch.from_numpy(m), persistent=False)
        self.evidence = nn.Linear(2 * channels, len(CLASSES))
        # classes the evidence head learnt (enough positives); the others rely on the concepts alone
        self.register_buffer("learnt", torch.zeros(len(CLASSES), dtype=torch.bool))
        # the training photos' pooled grids: their mean and k-means centroids (unit length, after centring);
        # none (checkpoints of earlier versions): every photo counts as familiar
        self.register_buffer("domain_mean", torch.zeros(2 * channels))
        self.register_buffer("domain_centroids", torch.zeros(centroids, 2 * channels))
        # concept word -> evidence class (cat -> cat, puppy -> dog, taxi -> car), -1 when none
        self.register_buffer("class_of_word", torch.tensor(
            [CLASSES.index(WORD_TO_OBJECT[w]) if w in WORD_TO_OBJECT else -1 for w in self.words]), persistent=False)

    @classmethod
    def from_encoder(cls, settings: GroundingSettings | None = None, centroids: int = 0) -> "Grounding":
        """Untrained evidence head, ImageNet classifier copied from the pretrained Lite2."""
        from captioner.features.encoder import pretrained_net
        g = cls(settings=settings, centroids=centroids)
        fc = pretrained_net("lite2")._fc
        g.imagenet.load_state_dict(fc.state_dict())
        return g

    def settings_dict(self) -> dict:
        return asdict(self.settings)

    def forward(self, grid: torch.Tensor):
        """(B, R, C) grids -> concept probabilities (B, W), class evidence (B, len(CLASSES)), familiarity (B,)."""
        grid = grid.float()
        pooled = _pool(grid)
        concepts = (torch.softmax(self.imagenet(grid[..., :1280].mean(1)), 1) @ self.word_of_class).clamp_(max=1)
        evidence = torch.sigmoid(self.evidence(pooled))
        evidence = torch.where(self.learnt, evidence, torch.zeros_like(evidence))
        if self.settings.person_odds != 1.0:
            odds = evidence[:, 0] / (1 - evidence[:, 0]).clamp(min=1e-6) * self.settings.person_odds
            evidence = torch.cat([(odds / (1 + odds)).unsqueeze(1), evidence[:, 1:]], 1)
        # a confident concept is evidence of its class too (ImageNet knows cats and zebras; Flickr8k barely)
        idx = self.class_of_word.clamp(min=0).expand(len(grid), -1)
        from_concepts = torch.zeros_like(evidence).scatter_reduce_(
            1, idx, concepts * (self.class_of_word >= 0), reduce="amax")
        return concepts, torch.maximum(evidence, from_concepts), self.familiarity(pooled)

    def familiarity(self, pooled: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each pooled grid to the nearest training centroid (1 without centroids)."""
        if len(self.domain_centroids) == 0:
            return torch.ones(len(pooled))
        x = torch.nn.functional.normalize(pooled - self.domain_mean, dim=1)
        return (x @ self.domain_centroids.T).amax(1)

    def familiar(self, concepts: torch.Tensor, familiarity: torch.Tensor) -> torch.Tensor:
        """(B,) True where the photo looks like Flickr8k's: close to its training photos and no object close-up."""
        s = self.settings
        subjects = self.class_of_word != CLASSES.index("dog")  # ImageNet's dog breeds are Flickr8k's own subject
        return (familiarity >= s.familiar_above) & ~((concepts * subjects) >= s.object_photo_above).any(1)

    def _vocab_maps(self, itos: list[str]):
        """(object word ids, their class indices, concept word ids, their concept indices) for a vocabulary;
        computed once per vocabulary, as decoding asks for every batch."""
        key = id(itos)
        if key not in self._maps or self._maps[key][0] is not itos:
            pairs = [(i, CLASSES.index(WORD_TO_OBJECT[w])) for i, w in enumerate(itos)
                     if w in WORD_TO_OBJECT and w != "orange"]  # the colour stays sayable
            ids = {w: i for i, w in enumerate(itos)}
            concept = [(ids[w], k) for k, w in enumerate(self.words) if w in ids]
            as_tensors = lambda p: tuple(torch.tensor(c, dtype=torch.long) for c in zip(*p)) if p else (
                torch.zeros(0, dtype=torch.long),) * 2
            self._maps[key] = (itos, *as_tensors(pairs), *as_tensors(concept))
        return self._maps[key][1:]

    def word_bias(self, concepts, evidence, familiar, itos: list[str]) -> torch.Tensor:
        """(B, V) additive log-probability bias for decoding; objects with less evidence than `ban_below`
        (`ban_unfamiliar` where `familiar` (B,) is False) cannot be named."""
        s = self.settings
        cols, cls, concept_cols, concept_idx = self._vocab_maps(itos)
        bias = torch.zeros(len(evidence), len(itos))
        e = evidence[:, cls]
        floor = torch.tensor([s.ban_class.get(CLASSES[c], 0.0) for c in cls.tolist()])
        ban = e < torch.maximum(torch.where(familiar, s.ban_below, s.ban_unfamiliar).unsqueeze(1), floor)
        bias[:, cols] = (s.weight * e.clamp(min=1e-6).log()).masked_fill(ban, -float("inf"))
        bias[:, concept_cols] += s.boost * concepts[:, concept_idx]
        return bias

    def confidence(self, caption: str, evidence: torch.Tensor) -> float:
        """The evidence of the least supported object the caption names; when it names none, that of the most
        evident class the head learnt (a sentence about nothing recognisable is no more certain than that)."""
        named = [float(evidence[CLASSES.index(c)]) for c in object_classes(caption)]
        if named:
            return min(named)
        return float(evidence[self.learnt].max()) if self.learnt.any() else 0.0

    def tags(self, concepts: torch.Tensor, evidence: torch.Tensor, at_least: float) -> list[tuple[str, float]]:
        """What the photo evidently shows, most probable first: ImageNet concept words and the evidence head's
        classes (person, ...) at `at_least` or more."""
        tags = dict((w, p) for w, p in zip(self.words, concepts.tolist()) if p >= at_least)
        for i, c in enumerate(CLASSES):
            if bool(self.learnt[i]) and evidence[i] >= at_least and c not in tags:
                tags[c] = float(evidence[i])
        return sorted(tags.items(), key=lambda t: -t[1])

    def describe(self, caption: str, concepts: torch.Tensor, evidence: torch.Tensor) -> dict:
        """One image: the text to say, its confidence and the tags. `caption` is the grounded decoder's sentence.

        - It names an object: said as it is, with the most evident object it misses added ("... with a cup"),
          and "Probably ..." before it when its confidence is under `hedge_below`.
        - It names nothing: every subject it wanted was forbidden, so it comes out broken ("a black and white is
          sitting"); only the ImageNet concepts are said, which are precise where the Flickr8k-trained evidence
          is not: "Image may contain: pizza, plate", else `unsure_text`."""
        s = self.settings
        tags = self.tags(concepts, evidence, s.say_less_below)
        named = object_classes(caption)
        if not named:
            sure = sorted(((w, p) for w, p in zip(self.words, concepts.tolist()) if p >= s.maybe_above),
                          key=lambda t: -t[1])[:3]
            text = "Image may contain: " + ", ".join(w for w, _ in sure) if sure else s.unsure_text
            confidence = sure[0][1] if sure else 0.0
        else:
            missing = sorted((float(p), c) for c, p in zip(CLASSES, evidence.tolist())
                             if p >= s.add_concepts and c not in named and c != "person")
            text = caption + (f" with {_article(CLASS_WORD.get(missing[-1][1], missing[-1][1]))}" if missing else "")
            confidence = self.confidence(text, evidence)
            if confidence < s.hedge_below:
                text = "Probably " + text
        return {"text": text, "confidence": round(confidence, 4),
                "concepts": [{"word": w, "p": round(p, 4)} for w, p in tags]}


def _article(word: str) -> str:
    if word.endswith("s") and not word.endswith("ss"):
        return word
    return ("an " if word[0] in "aeiou" else "a ") + word


# ------------------------------------------------------------------------------------------------
# training the evidence head

def evidence_labels(captions_per_image: list[list[str]]) -> np.ndarray:
    """(N, len(CLASSES)) 1 where some caption of the image names the class."""
    y = np.zeros((len(captions_per_image), len(CLASSES)), np.float32)
    for n, caps in enumerate(captions_per_image):
        for c in set().union(*(object_classes(cap) for cap in caps)):
            y[n, CLASSES.index(c)] = 1.0
    return y


def fit_grounding(workdir, settings: GroundingSettings | None = None, batch: int = 500) -> tuple[Grounding, dict]:
    """The heads for a model trained on WORKDIR's lite2 feature store: ImageNet classifier copied from the
    encoder, evidence head trained on the train split's grids and captions."""
    from captioner.data.datasets import load_prepared
    from captioner.features.store import FeatureStore
    records = load_prepared(workdir).split("train")
    store = FeatureStore.open(workdir, "lite2")
    records = [r for r in records if r.image_id in store]
    pooled = torch.cat([_pool(torch.from_numpy(store.get([r.image_id for r in records[i:i + batch]])).float())
                        for i in range(0, len(records), batch)])
    g = Grounding.from_encoder(settings, centroids=CENTROIDS)
    labels = evidence_labels([r.captions for r in records])
    info = train_evidence(g, pooled, labels)
    fit_domain(g, pooled)
    with_person = float(labels[:, CLASSES.index("person")].mean())
    g.settings.person_odds = round((1 - with_person) / with_person, 4)  # to a prior of one half
    info["person_rate"] = with_person
    return g.eval(), {**info, "train_images": len(records)}


def train_evidence(grounding: Grounding, pooled: torch.Tensor, labels: np.ndarray, *, epochs: int = 300,
                   lr: float = 1e-2, l2: float = 0.1, seed: int = 0) -> dict:
    """Fit the evidence head on pooled grids (N, 2C) (full batch, Adam, L2 on the weights): seconds on a CPU.
    l2 = 0.1 and 300 steps gave the lowest dev log-loss of l2 in {1e-3, 1e-2, 3e-2, 0.1} x {100, 300} steps, and
    95% of dev predictions >= 0.5 are right."""
    torch.manual_seed(seed)
    y = torch.from_numpy(labels)
    counts = y.sum(0)
    grounding.learnt.copy_(counts >= MIN_POSITIVES)
    head = grounding.evidence
    nn.init.zeros_(head.weight)
    head.bias.data.copy_(torch.logit(((counts + 1) / (len(y) + 2)).clamp(1e-4, 1 - 1e-4)))
    x = pooled.float()
    mu, sd = x.mean(0), x.std(0) + 1e-3
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(head((x - mu) / sd), y) + l2 * head.weight.pow(2).sum() / len(CLASSES)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.div_(sd)
        head.bias.sub_(head.weight @ mu)
    return {"loss": loss.item(), "learnt": [c for c, k in zip(CLASSES, grounding.learnt.tolist()) if k]}



def fit_domain(grounding: Grounding, pooled: torch.Tensor, *, iterations: int = 20, seed: int = 0) -> None:
    """k-means (cosine, spherical) of the training photos' pooled grids (N, 2C) into the familiarity buffers."""
    mean = pooled.float().mean(0)
    x = torch.nn.functional.normalize(pooled.float() - mean, dim=1)
    k = len(grounding.domain_centroids)
    centroids = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iterations):
        nearest = (x @ centroids.T).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, x)
        moved = sums.norm(dim=1) > 0  # a centroid nobody chose stays where it is
        centroids[moved] = torch.nn.functional.normalize(sums[moved], dim=1)
    grounding.domain_mean.copy_(mean)
    grounding.domain_centroids.copy_(centroids)
