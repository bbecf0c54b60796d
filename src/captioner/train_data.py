"""What training reads: one item per image (its grid and all its captions) from a feature store, the
batches they are grouped into, and how a batch is stacked."""
from __future__ import annotations

import numpy as np
import torch

from captioner.features.store import FeatureStore


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of images with similar caption lengths, so little work goes into padding.
    Depends only on (seed, epoch): a resumed run sees exactly the batches it would have seen."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


MIRRORED_WORDS = {"left": "right", "right": "left"}  # what a caption of the mirror image says instead


class CaptionDataset(torch.utils.data.Dataset):
    """One item per image of `split` that is in the store: (features (R, C), captions (k, L)).

    With a `mirrored` store and flip_prob > 0, each image is shown mirrored (its captions' left and
    right swapped) with that probability; with `crops` (stores of cropped, colour-jittered copies), an image not
    mirrored is shown as one of them or as itself, all equally likely. Both are decided by (seed, epoch, item), so
    a resumed run sees the same."""

    def __init__(self, store: FeatureStore, data, split: str, max_len: int = 30,
                 mirrored: FeatureStore | None = None, flip_prob: float = 0.0, seed: int = 0,
                 crops: list[FeatureStore] = ()):
        self.store, self.max_len = store, max_len
        self.mirrored, self.flip_prob, self.seed, self.epoch = mirrored, flip_prob, seed, 0
        self.crops = list(crops)
        self.tokens = data.tokens
        self.vocab = data.vocab
        self.image_ids = [r.image_id for r in data.split(split) if r.image_id in store and data.tokens.get(r.image_id)
                          and (mirrored is None or r.image_id in mirrored)
                          and all(r.image_id in c for c in self.crops)]

    def __len__(self) -> int:
        return len(self.image_ids)

    def flipped(self, i: int) -> bool:
        return (self.mirrored is not None and self.flip_prob > 0
                and np.random.default_rng([self.seed, self.epoch, i]).random() < self.flip_prob)

    def source(self, i: int) -> FeatureStore:
        """The store item i is read from this epoch."""
        if self.flipped(i):
            return self.mirrored
        k = np.random.default_rng([self.seed, self.epoch, i, 1]).integers(len(self.crops) + 1) if self.crops else 0
        return self.crops[k - 1] if k else self.store

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        flip = self.flipped(i)
        features = torch.from_numpy(self.source(i).get([image_id])[0])
        tokens = self.tokens[image_id]
        if flip:
            tokens = [[MIRRORED_WORDS.get(w, w) for w in t] for t in tokens]
        rows = [self.vocab.encode(t, self.max_len) for t in tokens]
        captions = torch.full((len(rows), max(map(len, rows))), self.vocab.pad_id, dtype=torch.long)
        for j, r in enumerate(rows):
            captions[j, :len(r)] = torch.tensor(r)
        return features, captions


def collate_images(batch, pad_id: int = 0):
    """[(features (R,C), captions (k_i, L_i))] -> features (B,R,C), captions (sum k_i, Lmax), image_index (sum k_i,).

    image_index[n] is the batch position of caption n's image: a model runs per-image work once
    and expands it with features[image_index]."""
    features = torch.stack([f for f, _ in batch])
    longest = max(c.shape[1] for _, c in batch)
    captions = torch.cat([torch.nn.functional.pad(c, (0, longest - c.shape[1]), value=pad_id) for _, c in batch])
    image_index = torch.cat([torch.full((c.shape[0],), b, dtype=torch.long) for b, (_, c) in enumerate(batch)])
    return features, captions, image_index
