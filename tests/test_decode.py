"""Greedy and beam search: exactness, the known-best-sequence case, batching, the no-<end> case."""
import math

import pytest
import torch

from captioner.beam import REPEAT_PENALTY, beam_search
from captioner.config import Config
from captioner.data.vocab import Vocabulary
from captioner.decode import decode, greedy, sample
from captioner.model import ShowAttendTell

VOCAB = Vocabulary(list(Vocabulary.SPECIALS) + ["x", "y", "z"])
A, B_, C = 4, 5, 6


class TableModel(torch.nn.Module):
    """A 'model' whose next-word probabilities depend only on the previous word: the best caption is known."""

    def __init__(self, table: dict[int, dict[int, float]]):
        super().__init__()
        self.vocab_size = len(VOCAB)
        self.table = table

    select_state = staticmethod(ShowAttendTell.select_state)

    def init_state(self, features):
        n = features.size(0)
        return (features, torch.zeros(n, 1), torch.zeros(n, 1), torch.zeros(n, 1))

    def step(self, tokens, state):
        logits = torch.full((tokens.size(0), self.vocab_size), -1e9)
        for row, tok in enumerate(tokens.tolist()):
            for word, p in self.table.get(tok, {}).items():
                logits[row, word] = math.log(p)
        alpha = torch.full((tokens.size(0), state[0].size(1)), 1.0 / state[0].size(1))
        return logits, alpha, state


def numpy_search(model: TableModel, vocab: Vocabulary, **options):
    """The torch-free search (beam.beam_search) over a table model, for one image: its n best."""
    def step(tokens, state):
        logits, alpha, state = model.step(torch.from_numpy(tokens), state)
        return logits.numpy(), alpha.numpy(), state
    return beam_search(step, lambda s, rows, images: model.select_state(s, torch.as_tensor(rows)),
                       model.init_state(feats()), vocab, 1, **options)[0]


# From <start>: x 0.5, y 0.4, z 0.1. After x: nothing likely (end 0.3). After y: end 0.9.
# Greedy takes "x" then ends: 0.5 * 0.3 = 0.15. The best caption is "y": 0.4 * 0.9 = 0.36.
TRAP = {1: {A: 0.5, B_: 0.4, C: 0.1}, A: {2: 0.3, A: 0.25, B_: 0.25, C: 0.2}, B_: {2: 0.9, C: 0.1},
        C: {2: 0.5, C: 0.5}}


def feats(n=1, r=4, c=3):
    return torch.zeros(n, r, c)


def test_beam_finds_the_best_sequence_where_greedy_does_not():
    model = TableModel(TRAP)
    assert greedy(model, VOCAB, feats(), block_trigrams=False)[0].tokens == ["x"]
    best = decode(model, VOCAB, feats(), beam_size=3, block_trigrams=False)[0][0]
    assert best.tokens == ["y"]
    assert best.score == pytest.approx(math.log(0.36), abs=1e-5)


def test_n_best_is_sorted_and_scored():
    hyps = decode(TableModel(TRAP), VOCAB, feats(), beam_size=3, n_best=3, block_trigrams=False)[0]
    assert len(hyps) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert hyps[1].tokens == ["x"]  # 0.15 is second


def test_no_end_within_max_len_still_returns_a_caption():
    never_ends = {1: {A: 0.6, B_: 0.4}, A: {A: 0.6, B_: 0.4}, B_: {A: 0.6, B_: 0.4}}
    model = TableModel(never_ends)
    for k in (1, 3):
        out = decode(model, VOCAB, feats(2), beam_size=k, max_len=5, block_trigrams=False)
        assert all(len(h[0].tokens) == 5 for h in out)
    assert len(greedy(model, VOCAB, feats(), max_len=5, block_trigrams=False)[0].tokens) == 5


def test_a_word_said_again_costs_the_repeat_penalty_in_both_searches():
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + ["white", "on", "bus"])
    white, on, bus = (vocab.stoi[w] for w in ("white", "on", "bus"))
    model = TableModel({1: {white: 0.6, bus: 0.4}, white: {on: 0.7, 2: 0.3}, bus: {on: 0.7, 2: 0.3},
                        on: {bus: 0.55, white: 0.45}})
    model.vocab_size = len(vocab)
    # "white" may be said again for free (beam.REPEATABLE); "bus" again costs REPEAT_PENALTY, more than its lead
    assert greedy(model, vocab, feats())[0].tokens == "white on bus on white on white".split()
    assert greedy(model, vocab, feats(), repeat_penalty=0.0)[0].tokens == "white on bus on bus".split()
    free = {" ".join(h.tokens): h.score for h in decode(model, vocab, feats(), beam_size=5, n_best=5,
                                                         repeat_penalty=0.0)[0]}
    assert free["white on bus on bus"] == pytest.approx(math.log(0.6 * 0.7 * 0.55 * 0.7 * 0.55 * 0.3), abs=1e-5)
    hyps = decode(model, vocab, feats(), beam_size=5, n_best=5)[0]
    scores = {" ".join(h.tokens): h.score for h in hyps}
    assert "white on bus on bus" not in scores
    assert scores["white on white"] == pytest.approx(math.log(0.6 * 0.7 * 0.45 * 0.3), abs=1e-5)

    out = numpy_search(model, vocab, beam_size=5, n_best=5)  # the torch-free search over the same table
    # the four that can be said (a fifth, impossible one at -1e9 may differ in how ties break)
    assert [(h.tokens, pytest.approx(h.score, abs=1e-5)) for h in out][:4] == [(h.tokens, h.score) for h in hyps][:4]


def test_trigram_blocking_stops_repetition():
    loop = {1: {A: 0.9, B_: 0.1}, A: {B_: 0.9, C: 0.1}, B_: {A: 0.9, C: 0.1}, C: {2: 0.9, A: 0.1}}
    plain = greedy(TableModel(loop), VOCAB, feats(), max_len=12, block_trigrams=False)[0].tokens
    assert plain == ["x", "y"] * 6
    blocked = greedy(TableModel(loop), VOCAB, feats(), max_len=12, block_trigrams=True)[0].tokens
    trigrams = list(zip(blocked, blocked[1:], blocked[2:]))
    assert len(trigrams) == len(set(trigrams))


def random_model(seed=0):
    torch.manual_seed(seed)
    cfg = Config(feature_dim=16, num_regions=9, embed_dim=16, project_dim=16, attention_dim=8, decoder_dim=16,
                 dropout=0.0)
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + [f"w{i}" for i in range(30)])
    model = ShowAttendTell(cfg, len(vocab)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.out.weight, std=3.0)  # peaky, input-dependent word choices
        model.out.bias[vocab.end_id] += 1.0  # so that some captions end before max_len
    return model, vocab, torch.randn(7, 9, 16)


def test_beam_one_equals_greedy_exactly():
    model, vocab, x = random_model()
    g = greedy(model, vocab, x, max_len=15)
    b = decode(model, vocab, x, beam_size=1, max_len=15)
    assert [c.tokens for c in g] == [h[0].tokens for h in b]
    assert [c.score for c in g] == pytest.approx([h[0].score for h in b], abs=1e-4)
    assert any(len(c.tokens) < 15 for c in g) and any(len(c.tokens) > 0 for c in g)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_batched_beam_equals_one_image_at_a_time(k):
    model, vocab, x = random_model(0)
    batched = decode(model, vocab, x, beam_size=k, n_best=k, max_len=12)
    for i in range(x.size(0)):
        alone = decode(model, vocab, x[i:i + 1], beam_size=k, n_best=k, max_len=12)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
    assert sum(len(c.tokens) > 0 for h in batched for c in h) >= 3  # real captions, not all empty


def test_attention_per_word_and_unk_suppression():
    model, vocab, x = random_model(0)
    with torch.no_grad():
        model.out.bias[vocab.unk_id] += 5.0  # <unk> would win everywhere
    out = decode(model, vocab, x, beam_size=3, max_len=10, return_attention=True)
    for hyps in out:
        cap = hyps[0]
        assert "<unk>" not in cap.tokens
        assert cap.attention.shape == (len(cap.tokens), 9)
        assert cap.attention.sum(1) == pytest.approx([1.0] * len(cap.tokens), abs=1e-4)
    assert any("<unk>" in h[0].tokens for h in decode(model, vocab, x, beam_size=3, max_len=10, suppress_unk=False))


def test_captions_are_never_empty():
    ends_at_once = {1: {2: 0.9, A: 0.1}, A: {2: 1.0}}
    model = TableModel(ends_at_once)
    assert greedy(model, VOCAB, feats(), block_trigrams=False)[0].tokens == ["x"]
    assert decode(model, VOCAB, feats(), beam_size=3, block_trigrams=False)[0][0].tokens == ["x"]
    assert greedy(model, VOCAB, feats(), min_len=0, block_trigrams=False)[0].tokens == []


def test_captions_never_end_on_a_bad_ending_word():
    # vocabulary "of" "dog" "x": after "of" <end> is most likely; a caption must still not stop there
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + ["of", "dog", "x"])
    table = {1: {A: 0.9, C: 0.1}, A: {2: 0.7, B_: 0.3}, B_: {2: 1.0}, C: {2: 1.0}}
    model = TableModel(table)
    assert greedy(model, vocab, feats(), block_bad_endings=False)[0].tokens == ["of"]
    assert greedy(model, vocab, feats())[0].tokens == ["of", "dog"]
    assert decode(model, vocab, feats(), beam_size=3)[0][0].tokens == ["of", "dog"]
    assert decode(model, vocab, feats(), beam_size=3, block_bad_endings=False)[0][0].tokens == ["of"]


def test_captions_never_end_on_a_colour_that_opens_a_noun_phrase():
    # "a white" <end> is likely but unfinished ("sitting on a white"); "is white" may end
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + ["a", "white", "dog", "is"])
    D_ = 7
    table = {1: {A: 0.6, D_: 0.4}, A: {B_: 0.9, C: 0.1}, B_: {2: 0.8, C: 0.2}, C: {2: 1.0}, D_: {B_: 1.0}}
    model = TableModel(table)
    model.vocab_size = len(vocab)
    assert greedy(model, vocab, feats(), block_bad_endings=False)[0].tokens == ["a", "white"]
    assert greedy(model, vocab, feats())[0].tokens == ["a", "white", "dog"]
    hyps = decode(model, vocab, feats(), beam_size=3, n_best=3)[0]
    assert [h.tokens for h in hyps] == [["is", "white"], ["a", "white", "dog"], ["is", "white", "dog"]]

    out = numpy_search(model, vocab, beam_size=3, n_best=3)  # the torch-free search keeps the same rule
    assert [h.tokens for h in out] == [h.tokens for h in hyps]
    words, _, mask = sample(model, vocab, feats(), 50)
    ends = [[vocab.itos[w] for w, m in zip(row, keep) if m][-3:] for row, keep in zip(words.tolist(), mask.tolist())]
    assert ["a", "white", "<end>"] not in ends and ["is", "white", "<end>"] in ends


def test_no_search_says_a_word_twice_in_a_row():
    # "young young" is likelier than "young boy" here (as where grounding forbids the word the decoder wanted next)
    vocab = Vocabulary(list(Vocabulary.SPECIALS) + ["a", "young", "boy"])
    a, young, boy = (vocab.stoi[w] for w in ("a", "young", "boy"))
    model = TableModel({1: {a: 0.9, young: 0.1}, a: {young: 1.0}, young: {young: 0.7, boy: 0.3}, boy: {2: 1.0}})
    model.vocab_size = len(vocab)
    twice = lambda words: any(x == y for x, y in zip(words, words[1:]))
    assert greedy(model, vocab, feats())[0].tokens == ["a", "young", "boy"]
    hyps = decode(model, vocab, feats(), beam_size=3, n_best=3)[0]
    assert hyps[0].tokens == ["a", "young", "boy"] and hyps[0].score == pytest.approx(math.log(0.9 * 0.3), abs=1e-5)
    assert not any(twice(h.tokens) for h in hyps)
    out = numpy_search(model, vocab, beam_size=3, n_best=1)
    assert out[0].tokens == ["a", "young", "boy"]
    words, _, mask = sample(model, vocab, feats(), 50)
    assert not any(twice([w for w, m in zip(row, keep) if m]) for row, keep in zip(words.tolist(), mask.tolist()))


def test_ensemble_averages_word_probabilities():
    from captioner.decode import Ensemble
    same = Ensemble([TableModel(TRAP), TableModel(TRAP)])
    best = decode(same, VOCAB, feats(), beam_size=3, block_trigrams=False)[0][0]
    assert best.tokens == ["y"] and best.score == pytest.approx(math.log(0.36), abs=1e-5)
    # alone, one model says "x" and the other "z"; their average prefers "y" (0.425 vs 0.325 and 0.25)
    m1 = TableModel({1: {A: 0.6, B_: 0.4}, A: {2: 1.0}, B_: {2: 1.0}, C: {2: 1.0}})
    m2 = TableModel({1: {C: 0.5, B_: 0.45, A: 0.05}, A: {2: 1.0}, B_: {2: 1.0}, C: {2: 1.0}})
    assert greedy(m1, VOCAB, feats())[0].tokens == ["x"] and greedy(m2, VOCAB, feats())[0].tokens == ["z"]
    assert greedy(Ensemble([m1, m2]), VOCAB, feats())[0].tokens == ["y"]
    with pytest.raises(ValueError, match="one vocabulary"):
        big = TableModel(TRAP)
        big.vocab_size += 1
        Ensemble([TableModel(TRAP), big])


def test_the_attention_tanh_is_tanh_with_and_without_gradients():
    from captioner.model import _tanh
    x = torch.linspace(-30, 30, 20001, requires_grad=True)
    y = _tanh(x)
    y.sum().backward()
    exact = torch.tanh(x.detach())
    assert (y.detach() - exact).abs().max() < 1e-6
    assert (x.grad - (1 - exact ** 2)).abs().max() < 1e-6
    with torch.inference_mode():  # the in-place path decoding takes
        assert (_tanh(x.detach()) - exact).abs().max() < 1e-6
