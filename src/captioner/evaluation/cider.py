"""CIDEr-D fast enough to be a training reward, equal to pycocoevalcap's `Cider` on the same inputs.

pycocoevalcap computes document frequencies from the references of the images it is scoring and
then walks Python dicts pair by pair. For self-critical training the document frequencies come
from the training references once (as in Rennie et al. 2017), each image's references are turned
into tf-idf vectors once, and a batch of candidates is scored with numpy: candidate and reference
vectors live in one dense matrix over the batch's candidate n-grams, so the clipped dot products of
every (candidate, reference) pair are one `minimum`, one product and one matrix product.

The formula is pycocoevalcap's, term for term: n = 1..4, weight tf * (log(#images) - log(max(1, df))),
numerator sum_g min(c_g, r_g) * r_g, cosine normalisation per n, Gaussian length penalty with
sigma 6 on the difference in bigram counts, mean over n and references, times 10.
Inputs are PTB-tokenised, space-joined strings (see metrics.tokenize_captions / metrics.ptb_tokenize).
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np


def ngram_counts(caption: str, n: int = 4) -> Counter:
    words = caption.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """Scores candidates against the references given at construction, with their df statistics.

    `CiderD(refs).scores(candidates, image_ids)` with `refs` the references of exactly the images being
    scored reproduces pycocoevalcap's per-image scores; with `refs` the whole training set it is the
    SCST reward.
    """

    def __init__(self, references: dict[str, list[str]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs references to take document frequencies from")
        self.n, self.sigma = n, sigma
        df: Counter = Counter()
        cooked = {}
        for image_id, refs in references.items():
            counts = [ngram_counts(r, n) for r in refs]
            df.update({g for c in counts for g in c})
            cooked[image_id] = counts
        self.ref_len = math.log(float(len(references)))
        self._log_df = {g: math.log(max(1.0, d)) for g, d in df.items()}
        # per image: (per reference {ngram: weight}, norms (k, n), bigram lengths (k,))
        self._refs = {image_id: self._vectors(counts) for image_id, counts in cooked.items()}

    def _weight(self, gram, tf) -> float:
        return tf * (self.ref_len - self._log_df.get(gram, 0.0))

    def _vectors(self, counts_list):
        vecs, norms, lengths = [], np.zeros((len(counts_list), self.n)), np.zeros(len(counts_list))
        for j, counts in enumerate(counts_list):
            vec = {g: self._weight(g, tf) for g, tf in counts.items()}
            for g, w in vec.items():
                norms[j, len(g) - 1] += w * w
            lengths[j] = sum(tf for g, tf in counts.items() if len(g) == 2)
            vecs.append(vec)
        return vecs, np.sqrt(norms), lengths

    def scores(self, candidates: list[str], image_ids: list[str]) -> np.ndarray:
        """CIDEr-D (x10, the toolkit's scale) of each candidate against its image's references."""
        if len(candidates) != len(image_ids):
            raise ValueError(f"{len(candidates)} candidates but {len(image_ids)} image ids")
        missing = [i for i in dict.fromkeys(image_ids) if i not in self._refs]
        if missing:
            raise ValueError(f"{len(missing)} image(s) have no references, e.g. {missing[:3]}")
        # chunks keep the dense (pairs x n-grams) matrices small
        return np.concatenate([self._score_chunk(candidates[i:i + 256], image_ids[i:i + 256])
                               for i in range(0, len(candidates), 256)] or [np.zeros(0)])

    def _score_chunk(self, candidates: list[str], image_ids: list[str]) -> np.ndarray:
        cand_vecs, cand_norms, cand_lengths = self._vectors([ngram_counts(c, self.n) for c in candidates])

        # Columns: every n-gram of any candidate; reference n-grams outside them add nothing to a dot product.
        column: dict = {}
        for vec in cand_vecs:
            for g in vec:
                column.setdefault(g, len(column))
        order = np.zeros((len(column), self.n))
        for g, c in column.items():
            order[c, len(g) - 1] = 1.0

        C = np.zeros((len(candidates), len(column)))
        for i, vec in enumerate(cand_vecs):
            for g, w in vec.items():
                C[i, column[g]] = w
        pair_cand, R_rows, ref_norms, ref_lengths = [], [], [], []
        for i, image_id in enumerate(image_ids):
            vecs, norms, lengths = self._refs[image_id]
            for j, vec in enumerate(vecs):
                row = np.zeros(len(column))
                for g in cand_vecs[i]:
                    if g in vec:
                        row[column[g]] = vec[g]
                R_rows.append(row)
                pair_cand.append(i)
            ref_norms.append(norms)
            ref_lengths.append(lengths)
        pair_cand = np.asarray(pair_cand)
        R = np.stack(R_rows) if R_rows else np.zeros((0, len(column)))
        ref_norms, ref_lengths = np.concatenate(ref_norms), np.concatenate(ref_lengths)

        dot = (np.minimum(C[pair_cand], R) * R) @ order  # (pairs, n)
        denom = cand_norms[pair_cand] * ref_norms
        sim = np.divide(dot, denom, out=dot.copy(), where=denom != 0)
        delta = cand_lengths[pair_cand] - ref_lengths
        sim *= np.exp(-(delta ** 2) / (2 * self.sigma ** 2))[:, None]
        per_pair = sim.mean(axis=1)
        # mean over each candidate's references, times 10
        totals = np.bincount(pair_cand, weights=per_pair, minlength=len(candidates))
        counts = np.bincount(pair_cand, minlength=len(candidates))
        return 10.0 * totals / counts
