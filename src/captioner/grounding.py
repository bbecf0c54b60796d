"""Grounding: what the photo evidently shows, so that the caption says no more than that.

Two heads read the encoder's grid (pooled; they cost well under a millisecond on top of the encoder pass):
- concepts: EfficientNet-Lite2's own ImageNet classifier (the layer after the grid in the same network), its
  1,000 classes grouped into plain words (Egyptian cat, tabby -> "cat"; espresso -> "coffee", "cup") by the
  reviewed table data/imagenet_concepts.json. A word's probability is the summed probability of its classes.
  The same classifier on four corner windows of the grid gives region probabilities: an object that is not
  the photo's subject (the table under the plate) wins a window of its own.
- evidence: a multi-label classifier trained on Flickr8k's captions: P(some caption of this photo names
  COCO class c), for the classes Flickr8k mentions often enough to learn (person, dog, bicycle, ...).

The evidence of class c is the larger of the two. What decoding may name, the confidence and the words said
from these outputs are decided in describe.py (torch-free, shared by the torch-free runtime).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from captioner.data.objects import object_classes
# re-exported: the settings and tables live with the decisions, importable without torch
from captioner.describe import CLASSES, CONCEPTS_FILE, Describer, GroundingSettings, concept_classes, concept_table  # noqa: F401

MIN_POSITIVES = 20  # train images naming a class, below which the evidence head does not learn it
CENTROIDS = 256  # k-means centroids of the training photos' pooled grids, for familiarity


def _pool(grid: torch.Tensor) -> torch.Tensor:
    """(B, R, C) -> (B, 2C): mean and max over regions (the mean is what the ImageNet classifier reads)."""
    return torch.cat([grid.mean(1), grid.amax(1)], 1)


class Grounding(nn.Module):
    """Both heads and the familiarity centroids; `forward` gives concept probabilities (B, W), class evidence
    (B, len(CLASSES)), familiarity (B,) and region probabilities (B, len(CLASSES))."""

    def __init__(self, channels: int = 1280, settings: GroundingSettings | None = None, centroids: int = 0):
        super().__init__()
        self.settings = settings or GroundingSettings()
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
        self.register_buffer("class_of_word", torch.from_numpy(concept_classes(self.words)), persistent=False)

    @classmethod
    def from_encoder(cls, settings: GroundingSettings | None = None, centroids: int = 0) -> "Grounding":
        """Untrained evidence head, ImageNet classifier copied from the pretrained Lite2."""
        from captioner.features.encoder import imagenet_classifier
        g = cls(settings=settings, centroids=centroids)
        g.imagenet.load_state_dict(imagenet_classifier())
        return g

    def settings_dict(self) -> dict:
        return self.settings.to_dict()

    def forward(self, grid: torch.Tensor):
        """(B, R, C) grids -> concept probabilities (B, W), class evidence (B, len(CLASSES)), familiarity (B,)
        and the classes' region probabilities (B, len(CLASSES))."""
        grid = grid.float()
        pooled = _pool(grid)
        concepts, regions = self.concepts_and_regions(grid)
        evidence = torch.sigmoid(self.evidence(pooled))
        evidence = torch.where(self.learnt, evidence, torch.zeros_like(evidence))
        if self.settings.person_odds != 1.0:
            odds = evidence[:, 0] / (1 - evidence[:, 0]).clamp(min=1e-6) * self.settings.person_odds
            evidence = torch.cat([(odds / (1 + odds)).unsqueeze(1), evidence[:, 1:]], 1)
        # a confident concept is evidence of its class too (ImageNet knows cats and zebras; Flickr8k barely)
        from_concepts = self._classes(concepts)
        return concepts, torch.maximum(evidence, from_concepts), self.familiarity(pooled), regions

    def _words(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1280) pooled features -> (N, W) concept word probabilities."""
        return (torch.softmax(self.imagenet(features), 1) @ self.word_of_class).clamp_(max=1)

    def _classes(self, words: torch.Tensor) -> torch.Tensor:
        """(N, W) concept word probabilities -> (N, len(CLASSES)): the most probable word of each class."""
        idx = self.class_of_word.clamp(min=0).expand(words.shape[0], -1)  # shape, not len(): keeps the exported batch dynamic
        return torch.zeros(words.shape[0], len(CLASSES)).scatter_reduce_(
            1, idx, words * (self.class_of_word >= 0), reduce="amax")

    def concepts_and_regions(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, C) square grids -> concept word probabilities of the whole photo (B, W) and the classes' region
        probabilities (B, len(CLASSES)): the ImageNet classifier on four overlapping windows of three quarters of
        the photo's side (7x7 of 9x9, one per corner) and on the whole, each class's most probable. The
        whole-photo softmax names one subject; the table under a pizza or the bus behind a person wins a window
        of its own (benchmarks/grounding_sweep.py, docs/experiments.md)."""
        b, r, _ = grid.shape
        side = int(round(r ** 0.5))
        head = grid[..., :1280]  # the head's channels: what the ImageNet classifier reads
        whole = head.mean(1, keepdim=True)
        if side * side == r:  # a grid that is not square has only the whole photo
            size = side - side // 4
            x = head.reshape(b, side, side, 1280).permute(0, 3, 1, 2)
            whole = torch.cat([torch.nn.functional.avg_pool2d(x, size, max(1, side - size)).flatten(2)
                               .transpose(1, 2), whole], 1)
        words = self._words(whole.reshape(-1, 1280))
        words = words.reshape(b, -1, words.shape[1])
        return words[:, -1], self._classes(words.flatten(0, 1)).reshape(b, -1, len(CLASSES)).amax(1)

    def familiarity(self, pooled: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each pooled grid to the nearest training centroid (1 without centroids)."""
        if len(self.domain_centroids) == 0:
            return torch.ones(pooled.shape[0])
        x = torch.nn.functional.normalize(pooled - self.domain_mean, dim=1)
        return (x @ self.domain_centroids.T).amax(1)

    def describer(self) -> Describer:
        """The decisions on this model's outputs (describe.py); shares `settings`, so a change to them applies."""
        return Describer(self.settings, self.learnt.numpy(), self.words)


# ------------------------------------------------------------------------------------------------
# training the evidence head

def evidence_labels(captions_per_image: list[list[str]]) -> np.ndarray:
    """(N, len(CLASSES)) 1 where some caption of the image names the class."""
    y = np.zeros((len(captions_per_image), len(CLASSES)), np.float32)
    for n, caps in enumerate(captions_per_image):
        for c in set().union(*(object_classes(cap) for cap in caps)):
            y[n, CLASSES.index(c)] = 1.0
    return y


def has_imagenet_grid(encoder: str) -> bool:
    """True for encoders whose grid is Lite2's last feature map (any input size): what its ImageNet classifier reads."""
    from captioner.features.encoder import get_spec, spec_parts
    return spec_parts(get_spec(encoder)) == [("lite2", 0)]


def fit_grounding(workdir, settings: GroundingSettings | None = None, batch: int = 500,
                  encoder: str = "lite2") -> tuple[Grounding, dict]:
    """The heads for a model trained on WORKDIR's feature store of `encoder` (Lite2's last grid, see
    `has_imagenet_grid`): ImageNet classifier copied from the encoder, evidence head trained on the train split's
    grids and captions."""
    from captioner.data.datasets import load_prepared
    from captioner.features.store import FeatureStore
    if not has_imagenet_grid(encoder):
        raise ValueError(f"{encoder}: grounding heads need Lite2's last grid (lite2 or lite2@SIDE)")
    records = load_prepared(workdir).split("train")
    store = FeatureStore.open(workdir, encoder)
    records = [r for r in records if r.image_id in store]

    def over(store, ids, fn):  # fn of the grids of `ids`, `batch` at a time, concatenated
        return torch.cat([fn(torch.from_numpy(store.get(ids[i:i + batch])).float()) for i in range(0, len(ids), batch)])

    pooled = over(store, [r.image_id for r in records], _pool)
    g = Grounding.from_encoder(settings, centroids=CENTROIDS)
    if encoder != "lite2":  # another input size: the classifier reads grids the way it reads 260-pixel ones
        native = FeatureStore.open(workdir, "lite2")
        ids = [r.image_id for r in records if r.image_id in native]
        match_classifier(g, *(over(s, ids, lambda grid: grid[..., :1280].mean(1)) for s in (native, store)))
    labels = evidence_labels([r.captions for r in records])
    with torch.no_grad():
        concepts = over(store, [r.image_id for r in records], lambda grid: g.concepts_and_regions(grid)[0])
    g.settings.concept_presence = presence_curve(concepts.numpy(), labels, g.class_of_word.numpy())
    info = train_evidence(g, pooled, labels)
    fit_domain(g, pooled)
    with_person = float(labels[:, CLASSES.index("person")].mean())
    g.settings.person_odds = round((1 - with_person) / with_person, 4)  # to a prior of one half
    info["person_rate"] = with_person
    return g.eval(), {**info, "train_images": len(records)}


def presence_curve(concepts: np.ndarray, labels: np.ndarray, class_of_word: np.ndarray, step: float = 0.1,
                   min_photos: int = 20) -> list[list[float]]:
    """`GroundingSettings.concept_presence` from training photos: concept word probabilities (N, W) and class labels
    (N, len(CLASSES), `evidence_labels`). For each probability bin [p, p + step) from 0.1, the share of (photo,
    word) pairs whose class a caption names, at the bin's centre; made non-decreasing and cut at its top (the
    captions do not name everything, so the share stays under 1)."""
    words = np.flatnonzero(class_of_word >= 0)
    p = np.minimum(concepts[:, words], 1 - 1e-9).ravel()
    there = labels[:, class_of_word[words]].ravel()
    knots = []
    for low in np.arange(0.1, 1.0 - 1e-9, step):
        inside = (p >= low) & (p < low + step)
        if inside.sum() >= min_photos:
            knots.append([round(float(low + step / 2), 3), float(there[inside].mean())])
    shares = np.maximum.accumulate([s for _, s in knots]) if knots else np.zeros(0)
    top = int(np.argmax(shares)) + 1 if knots else 0
    return [[x, round(float(s), 3)] for (x, _), s in zip(knots[:top], shares[:top])]


def match_classifier(grounding: Grounding, native: torch.Tensor, other: torch.Tensor) -> None:
    """Adapt the ImageNet classifier to grids of another input size, from the mean grids (N, 1280) of the same
    train photos at 260 pixels (`native`) and at the other size. Lite2's classifier was trained at 260; at 320
    the mean grid has 14% less energy and the softmax is flatter (Flickr8k train: mean top probability 0.18
    against 0.27; the train-test resolution discrepancy, Touvron et al. 2019), so concepts fall under the
    thresholds chosen at 260. Each channel is mapped to the native mean and spread, folded into the classifier's
    weights: mean top probability 0.26, KL to the 260-pixel probabilities 0.20 -> 0.15."""
    a, b = native, other
    scale = a.std(0) / (b.std(0) + 1e-6)
    shift = a.mean(0) - b.mean(0) * scale
    with torch.no_grad():
        lin = grounding.imagenet
        lin.bias.add_(lin.weight @ shift)
        lin.weight.mul_(scale)


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
