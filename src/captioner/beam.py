"""Beam search in numpy, the search behind every caption people get (runtime.py): the same search as
decode.decode, over any decoder step that returns numpy arrays (the ONNX graphs of a model folder, or the int8
torch model), so both runtimes search alike. With torch's step it is as fast as decode.decode on one thread
(7.3 vs 7.6 ms a photo at beam 3: `python benchmarks/decode_speed.py --int8`).

decode.py keeps the torch search because training needs it (greedy dev scoring, sampling with gradients);
tests/test_api.py and tests/test_pretrained.py check that both searches give the same captions. Rules shared
with decode.py: the words that may not come next (<pad>, <start>, <unk>, <end> first or where `Endings` says the
caption is unfinished, the previous word again), repeated-trigram blocking, the cost of saying a word twice
(`repeat_costs`), and a per-image bias.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# A caption must not stop on these words ("a baby is playing in a pile of"); CIDEr-D barely punishes such
# endings, so self-critical training would otherwise learn them.
BAD_ENDINGS = frozenset("a an the and in for at of with before after on upon near to is are am".split())
# Nor on a colour that opens a noun phrase ("sitting on a white", "in a red and white"): 22 of 1,000 Flickr8k dev
# captions and 6 of the 100 coco-ood-dev ones ended so before this rule. "the dog is white" may still end. A colour
# after a colour opens one too: "holding a red and white red" (examples/astronaut.jpg, where grounding had
# forbidden the noun the decoder wanted).
COLOURS = frozenset("white black brown red blue green yellow orange pink purple grey gray".split())
OPENERS = frozenset("a an the and".split()) | COLOURS
# Words a caption may say more than once for free: articles, prepositions, numbers, colours, sizes ("a man in a
# white shirt and a white hat"). Any other word already in the hypothesis costs REPEAT_PENALTY log-probability,
# so "a man is sitting on a bus in a bus" loses to a sentence that says something new (issue 21, lever 5c:
# +0.3 to +0.6 CIDEr-D on Flickr8k dev, docs/experiments.md)
REPEATABLE = frozenset(
    "a an the is are was in on of with and at to his her their its it while for by from into through down up over "
    "near one two three four some other another dark light large small big little young".split()) | COLOURS
REPEAT_PENALTY = 2.0


def repeat_costs(vocab, penalty: float = REPEAT_PENALTY) -> np.ndarray:
    """(V,) float32: what saying each word again costs (0 for REPEATABLE words and the special tokens)."""
    costs = np.full(len(vocab), penalty, dtype=np.float32)
    costs[[vocab.stoi[w] for w in REPEATABLE.union(vocab.SPECIALS) if w in vocab.stoi]] = 0.0
    return costs


def word_table(vocab, words) -> np.ndarray:
    """(V,) bool: True for `words` (a lookup table; np.isin cost 0.1 ms a step)."""
    table = np.zeros(len(vocab), dtype=bool)
    table[[vocab.stoi[w] for w in words if w in vocab.stoi]] = True
    return table


class Endings:
    """Where a caption may not stop: after a BAD_ENDINGS word, or after a colour that follows an OPENER. The tables
    are numpy arrays, or torch tensors when `convert` is given (decode.py), so both searches share the rule."""

    def __init__(self, vocab, convert=None):
        convert = convert or (lambda a: a)
        self.bad, self.colour, self.opener = (convert(word_table(vocab, w)) for w in (BAD_ENDINGS, COLOURS, OPENERS))

    def unfinished(self, last, before=None):
        """(rows,) True where a caption whose last words are `before` (None: none yet), `last` may not end."""
        if before is None:
            return self.bad[last]
        return self.bad[last] | (self.colour[last] & self.opener[before])


@dataclass
class Caption:
    tokens: list[str]
    score: float  # sum of log-probabilities (length-normalised when asked)
    attention: np.ndarray | None = None  # (len(tokens), R): where the model looked for each word

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


# step(tokens (N,), state) -> (logits (N, V), attention (N, R), next state)
Step = Callable[[np.ndarray, tuple], tuple[np.ndarray, np.ndarray, tuple]]
# select(state, rows, images) keeps hypotheses `rows` (N',) and, where `images` is not None, images `images`:
# the blocks of K rows still searching. `images` is None while the same images search (model.select_state's
# signature, so a state may keep per-image tensors once per image rather than once per beam).
Select = Callable[[tuple, np.ndarray, np.ndarray | None], tuple]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _blocked(vocab, last: np.ndarray, seqs: np.ndarray, may_end: bool, endings: Endings, V: int) -> np.ndarray:
    """(rows, V) True where a word may not come next (the rules of decode.banned_words and trigram blocking)."""
    ban = np.zeros((len(last), V), dtype=bool)
    # no word twice in a row ("a young young a dog", "a small white is is playing"): 3 of the 29,983 Flickr8k train
    # captions do it; 7 of 1,000 Flickr8k dev and 5 of 100 coco-ood-dev descriptions did before this rule, mostly
    # where grounding had forbidden the word the decoder wanted next
    ban[np.arange(len(last)), last] = True
    ban[:, [vocab.pad_id, vocab.start_id, vocab.unk_id]] = True
    if not may_end:
        ban[:, vocab.end_id] = True
    else:
        ban[endings.unfinished(last, seqs[:, -2] if seqs.shape[1] >= 2 else None), vocab.end_id] = True
    if seqs.shape[1] >= 3:  # a word that would repeat a trigram already in the hypothesis
        for row, seq in enumerate(seqs.tolist()):
            for i in range(len(seq) - 2):
                if (seq[i], seq[i + 1]) == (seq[-2], seq[-1]):
                    ban[row, seq[i + 2]] = True
    return ban


def beam_search(step: Step, select: Select, state: tuple, vocab, n_images: int, *, beam_size: int = 3,
                max_len: int = 30, n_best: int = 1, bias: np.ndarray | None = None,
                return_attention: bool = False, repeat_penalty: float = REPEAT_PENALTY) -> list[list[Caption]]:
    """Per image, the n best captions best first. `state` holds one row per image; it is repeated for the
    beams here. An image is done once it has `beam_size` ended hypotheses; out of length, its live ones
    compete as they are. Scores are raw log-probabilities (decode.decode's default, length_norm 0)."""
    K = beam_size
    state = select(state, np.repeat(np.arange(n_images), K), None)
    tokens = np.full(n_images * K, vocab.start_id, dtype=np.int64)
    scores = np.full((n_images, K), -np.inf, dtype=np.float32)
    scores[:, 0] = 0.0  # only the first beam is live at the start, so the K beams do not start identical
    seqs = np.zeros((n_images * K, 0), dtype=np.int64)
    attn = None
    images = list(range(n_images))
    finished: list[list[tuple[float, list[int], np.ndarray | None]]] = [[] for _ in range(n_images)]
    endings = Endings(vocab)
    costs = repeat_costs(vocab, repeat_penalty)
    for t in range(max_len):
        logits, alpha, state = step(tokens, state)
        V = logits.shape[1]
        logp = _log_softmax(np.asarray(logits, dtype=np.float32))
        logp[_blocked(vocab, tokens, seqs, t >= 1, endings, V)] = -np.inf
        if bias is not None:
            logp += np.repeat(bias[images], K, axis=0)
        if repeat_penalty and t:
            said = np.zeros(logp.shape, dtype=bool)  # the words each row has said
            said[np.arange(len(seqs))[:, None], seqs] = True
            logp -= said * costs
        if return_attention:
            attn = alpha[:, None] if attn is None else np.concatenate([attn, alpha[:, None]], 1)
        # extend every beam by the K best of its image's K x V candidates (2K always leave K that do not end)
        total = (scores.reshape(-1, 1) + logp).reshape(len(images), K * V)
        cand = np.argpartition(-total, 2 * K - 1, axis=1)[:, :2 * K]  # the 2K best, unordered (a full sort: 2x slower)
        cand = np.take_along_axis(cand, np.lexsort((cand, -np.take_along_axis(total, cand, 1))), 1)  # best first
        cand_scores = np.take_along_axis(total, cand, 1)
        beam, word = cand // V, cand % V
        ended = word == vocab.end_id
        for b, k in zip(*np.nonzero(ended[:, :K] & np.isfinite(cand_scores[:, :K]))):
            row = b * K + beam[b, k]
            finished[images[b]].append((float(cand_scores[b, k]), seqs[row].tolist(),
                                        None if attn is None else attn[row]))
        keep = np.argsort(ended * (2 * K) + np.arange(2 * K), axis=1)[:, :K]
        scores = np.take_along_axis(cand_scores, keep, 1)
        rows = (np.arange(len(images))[:, None] * K + np.take_along_axis(beam, keep, 1)).reshape(-1)
        tokens = np.take_along_axis(word, keep, 1).reshape(-1)
        seqs = np.concatenate([seqs[rows], tokens[:, None]], 1)
        attn = None if attn is None else attn[rows]
        state = select(state, rows, None)
        if t == max_len - 1:  # out of length: the live beams of every unfinished image compete as they are
            for b, img in enumerate(images):
                if len(finished[img]) < K:
                    finished[img] += [(float(scores[b, k]), seqs[b * K + k].tolist(),
                                       None if attn is None else attn[b * K + k])
                                      for k in range(K) if np.isfinite(scores[b, k])]
            break
        blocks = [b for b, img in enumerate(images) if len(finished[img]) < K]  # images still searching
        if not blocks:
            break
        if len(blocks) < len(images):
            rows = (np.array(blocks)[:, None] * K + np.arange(K)).reshape(-1)
            images, scores = [images[b] for b in blocks], scores[blocks]
            tokens, seqs, state = tokens[rows], seqs[rows], select(state, rows, np.array(blocks))
            attn = None if attn is None else attn[rows]
    return [[Caption(vocab.decode(seq), score, None if att is None else att[:len(seq)])
             for score, seq, att in sorted(hyps, key=lambda h: -h[0])[:min(n_best, K)]] for hyps in finished]
