"""The vectorised CIDEr-D used as the SCST reward equals pycocoevalcap's Cider on the same inputs."""
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.data.datasets import read_dataset
from captioner.evaluation.cider import CiderD
from captioner.evaluation.metrics import ptb_tokenize


@pytest.fixture(scope="module")
def train_refs(flickr8k_root):
    records = read_dataset(flickr8k_root).split("train")
    return {r.image_id: [ptb_tokenize(c) for c in r.captions] for r in records}


def tricky_candidates(refs):
    """Real captions of the right and of other images, plus the edge cases of the formula."""
    ids = list(refs)
    rng = random.Random(0)
    cands = {}
    for k, i in enumerate(ids):
        cands[i] = refs[i][k % len(refs[i])] if k % 3 else refs[ids[rng.randrange(len(ids))]][0]
    odd = ["", "dog", "a a a a a a a a", "zzqq unseen words only", " ".join(refs[ids[7]][0].split()[::-1]),
           refs[ids[8]][0] + " " + refs[ids[8]][-1]]
    for i, c in zip(ids, odd):
        cands[i] = c
    return cands


def test_equals_pycocoevalcap_with_training_document_frequencies(train_refs):
    # pycocoevalcap takes df from the references of the images it scores: scoring every training image
    # therefore uses exactly the training-set df that the SCST reward uses.
    cands = tricky_candidates(train_refs)
    ids = list(train_refs)
    corpus, theirs = Cider().compute_score(train_refs, {i: [cands[i]] for i in ids})
    cider = CiderD(train_refs)
    ours = cider.scores([cands[i] for i in ids], ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert ours.mean() == pytest.approx(corpus, rel=1e-12)
    assert ours[0] == 0.0  # the empty caption

    # a batch scored alone keeps the training df: each score is the one it had in the full run
    pick = list(range(0, len(ids), 97)) + [1, 2, 3, 4, 5]
    batch = cider.scores([cands[ids[j]] for j in pick], [ids[j] for j in pick])
    np.testing.assert_allclose(batch, ours[pick], rtol=1e-12)


def test_equals_pycocoevalcap_on_a_small_corpus(train_refs):
    ids = list(train_refs)[:40]
    refs = {i: train_refs[i] for i in ids}
    cands = tricky_candidates(refs)
    _, theirs = Cider().compute_score(refs, {i: [cands[i]] for i in ids})
    np.testing.assert_allclose(CiderD(refs).scores([cands[i] for i in ids], ids), theirs, rtol=1e-9, atol=1e-12)


def test_bad_input():
    cider = CiderD({"a.jpg": ["a dog runs"], "b.jpg": ["a cat sits"]})
    with pytest.raises(ValueError, match="no references.*c.jpg"):
        cider.scores(["a dog"], ["c.jpg"])
    with pytest.raises(ValueError, match="2 candidates but 1 image ids"):
        cider.scores(["a dog", "a cat"], ["a.jpg"])
    with pytest.raises(ValueError, match="needs references"):
        CiderD({})
    assert cider.scores([], []).shape == (0,)
