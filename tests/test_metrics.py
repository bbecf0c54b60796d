"""Metrics: same numbers as pycocoevalcap run directly, corpus-level BLEU, <unk> never matches, no-Java path."""
import math
import os
from collections import Counter

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.evaluation import metrics
from captioner.evaluation.metrics import METRIC_KEYS, ptb_tokenize, score_captions

# Under CI (.ci/run installs Java) a missing Java fails these tests instead of skipping them silently.
needs_java = pytest.mark.skipif(not metrics.java_available() and not os.environ.get("CI"),
                                reason="needs java for the reference PTBTokenizer")

REFS = {
    "dog.jpg": ["A brown dog runs across the grass .", "A dog is running on a lawn .",
                "The dog's tail is up as it runs !", "A happy dog sprints outside .", "Brown dog running ."],
    "beach.jpg": ["Two children play in the sand at the beach .", "Kids building a sandcastle .",
                  "Two kids on a beach , near the water .", "Children playing by the sea .",
                  "Two young kids dig in the sand ."],
    "bike.jpg": ["A man rides a bike down a dirt path .", "A cyclist on a trail in the woods .",
                 "A person is riding a mountain bike .", "Man biking through the forest .",
                 "A biker in a red helmet ."],
}
CANDS = {"dog.jpg": "a brown dog is running on the grass",
         "beach.jpg": "two kids play in the sand",
         "bike.jpg": "a man riding a bike on a dirt road"}


def toolkit_scores(cands, refs, with_meteor=True):
    """pycocoevalcap run by hand, the way COCOEvalCap.evaluate() does it (minus SPICE)."""
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in cands})
    res = tok.tokenize({k: [{"caption": cands[k]}] for k in cands})
    out = {}
    b, b_img = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"bleu{n + 1}"] = (b[n], b_img[n])
    scorers = [("rougeL", Rouge()), ("cider", Cider())] + ([("meteor", Meteor())] if with_meteor else [])
    for key, scorer in scorers:
        out[key] = scorer.compute_score(gts, res)
    return out


def assert_same(ours, theirs, ids):
    for key, (corpus, per_image) in theirs.items():
        assert ours.corpus[key] == pytest.approx(corpus, rel=1e-9, abs=1e-12), key
        for k, v in zip(ids, per_image):
            assert ours.per_image[k][key] == pytest.approx(v, rel=1e-9, abs=1e-12), (key, k)


@needs_java
def test_equals_pycocoevalcap_run_directly():
    # one extra image whose <unk> candidate faces references that literally say "unk" and "<unk>";
    # the toolkit run by hand gets the documented stand-in word, so all other numbers must agree
    cands = {**CANDS, "unk.jpg": "<unk> <unk> <unk>"}
    refs = {**REFS, "unk.jpg": ["unk unk unk", "<unk> <unk> <unk>"]}
    ours = score_captions(cands, refs)
    assert ours.tokenizer == "ptb-java" and ours.notes == []
    assert set(ours.corpus) == set(METRIC_KEYS)
    by_hand = {k: v.replace("<unk>", metrics._UNK_STANDIN) for k, v in cands.items()}
    assert_same(ours, toolkit_scores(by_hand, refs), list(cands))
    assert all(v < 1e-6 for v in ours.per_image["unk.jpg"].values())
    assert ours.per_image["unk.jpg"]["meteor"] == 0.0
    # sanity: these are real, non-trivial scores on the toolkit's 0-1 scale (CIDEr 0-10)
    assert 0.3 < ours.corpus["bleu1"] < 1 and 0 < ours.corpus["meteor"] < 1 and ours.corpus["cider"] > 0.3


@needs_java
def test_perfect_candidate_one_reference_against_the_other_four(flickr8k_root):
    lines = (flickr8k_root / "text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()[:40]
    refs = {}
    for line in lines:
        name, caption = line.split("\t")
        refs.setdefault(name.split("#")[0], []).append(caption)
    cands = {k: v[0] for k, v in refs.items()}
    others = {k: v[1:] for k, v in refs.items()}
    ours = score_captions(cands, others, meteor=False)
    assert_same(ours, toolkit_scores(cands, others, with_meteor=False), list(cands))
    # a human caption is far from a perfect score against other humans: the toolkit's known behaviour
    assert 0.2 < ours.corpus["bleu4"] < 0.9 and ours.corpus["cider"] > 0.2


def test_identical_candidate_scores_one():
    refs = {"a": ["a dog runs on the grass"] * 3, "b": ["two kids play in the sand at the beach"] * 3}
    s = score_captions({"a": "A dog runs on the grass.", "b": "Two kids play in the sand at the beach."},
                       refs, tokenizer="python", meteor=False)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL"):
        assert s.corpus[key] == pytest.approx(1.0, abs=1e-6), key


def _corpus_bleu(cands, refs, n_max):
    """Plain corpus BLEU (clipped n-gram counts and lengths summed over images, closest ref length)."""
    correct, guess = [0] * n_max, [0] * n_max
    hyp_len = ref_len = 0
    for k, cand in cands.items():
        c = cand.split()
        rs = [r.split() for r in refs[k]]
        hyp_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, n_max + 1):
            grams = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
            best = Counter()
            for r in rs:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(v, best[g]) for g, v in grams.items())
            guess[n - 1] += max(len(c) - n + 1, 0)
    bp = min(1.0, math.exp(1 - ref_len / hyp_len))
    return bp * math.exp(sum(math.log(correct[i] / guess[i]) for i in range(n_max)) / n_max)


def test_corpus_bleu_is_corpus_level_not_mean_of_sentences():
    refs = {"a": ["a dog runs on the green grass", "the dog is running"],
            "b": ["two kids play in the sand", "children play at the beach by the sea"],
            "c": ["a man rides a red bike", "a cyclist on a trail"]}
    cands = {"a": "a dog runs on the grass", "b": "kids play at the sea", "c": "a man rides a bike on a trail"}
    s = score_captions(cands, refs, tokenizer="python", meteor=False)
    for n in (2, 4):
        expected = _corpus_bleu(cands, refs, n)
        assert s.corpus[f"bleu{n}"] == pytest.approx(expected, rel=1e-6)
        sentence_mean = sum(v[f"bleu{n}"] for v in s.per_image.values()) / len(cands)
        assert abs(s.corpus[f"bleu{n}"] - sentence_mean) > 1e-3


def test_unk_never_matches_a_reference_word():
    # references that literally contain "<unk>" and "unk": the candidate's <unk> must match neither
    refs = {"a": ["a <unk> dog runs on the grass", "a unk dog runs on grass"],
            "b": ["<unk> <unk> <unk> <unk>", "unk unk unk unk"]}
    with_unk = score_captions({"a": "a <unk> dog runs", "b": "<unk> <unk> <unk> <unk>"}, refs,
                              tokenizer="python", meteor=False)
    novel = score_captions({"a": "a qzxv dog runs", "b": "qzxv qzxv qzxv qzxv"}, refs,
                           tokenizer="python", meteor=False)
    assert with_unk.per_image["b"]["bleu1"] < 1e-6 and with_unk.per_image["b"]["cider"] == 0.0
    for key in ("bleu1", "bleu2", "rougeL", "cider"):
        assert with_unk.corpus[key] == pytest.approx(novel.corpus[key], abs=1e-12), key


def test_without_java_meteor_is_reported_unavailable(monkeypatch):
    java = metrics.java_available()
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    s = score_captions(CANDS, REFS)
    assert s.tokenizer == "ptb-python" and s.corpus["meteor"] is None
    assert any("METEOR unavailable" in n and "java" in n for n in s.notes)
    if java:  # the other scores are unchanged, since the Python tokenizer gives the same tokens
        monkeypatch.undo()
        with_java = score_captions(CANDS, REFS, meteor=False)
        for key in ("bleu1", "bleu4", "rougeL", "cider"):
            assert s.corpus[key] == with_java.corpus[key]


@needs_java
def test_python_tokenizer_equals_java_ptb_on_all_flickr8k_captions(flickr8k_root):
    lines = (flickr8k_root / "text" / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    captions = [line.split("\t", 1)[1] if "\t" in line else "" for line in lines]
    assert len(captions) > 40000
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    mismatches = [(c, java[str(i)][0], ptb_tokenize(c)) for i, c in enumerate(captions)
                  if ptb_tokenize(c) != java[str(i)][0]]
    assert mismatches == []


def test_python_tokenizer_rules():
    assert ptb_tokenize("A dog's ball (red).") == "a dog 's ball -lrb- red -rrb-"
    assert ptb_tokenize("We cannot see, don't \"look\"!") == "we can not see do n't look"
    assert ptb_tokenize("Mr. Potato in Washington D.C. on a t-shirt") == "mr. potato in washington d.c. on a t-shirt"


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no references"):
        score_captions({"x.jpg": "a dog"}, {"y.jpg": ["a dog"]}, meteor=False)
    with pytest.raises(ValueError, match="no candidate"):
        score_captions({}, {"y.jpg": ["a dog"]})
    with pytest.raises(ValueError, match="tokenizer"):
        score_captions({"y.jpg": "a dog"}, {"y.jpg": ["a dog"]}, tokenizer="spacy")
