"""Turning image features into words: greedy and beam search, batched over many images, and sampling for
self-critical training.

All three take the same decoder step, `next_logprobs` (the model's next-word log-probabilities with the
banned words cut out, plus a per-image word bias, trigram blocking and the cost of repeating a word), and
differ only in which words they keep. Beams live in the batch dimension (rows = images x beams) so one
`model.step` call advances every hypothesis of every image at once; images whose search is over leave the batch.
"""
from __future__ import annotations

import numpy as np
import torch

# Caption: the result type of every search
from captioner.beam import BAD_ENDINGS, REPEAT_PENALTY, Caption, Endings, repeat_costs  # noqa: F401
from captioner.data.vocab import Vocabulary
from captioner.model import ShowAttendTell


class Ensemble(torch.nn.Module):
    """Several models with one vocabulary decoded as one: each step averages their word probabilities
    (and attention maps). Has the interface `greedy` and `decode` use, so either accepts it as a model."""

    def __init__(self, models: list[ShowAttendTell]):
        super().__init__()
        if len({m.vocab_size for m in models}) != 1:
            raise ValueError("ensemble members must share one vocabulary")
        self.members = torch.nn.ModuleList(models)
        self.vocab_size = models[0].vocab_size

    def init_state(self, features):
        return [m.init_state(features) for m in self.members]

    def select_state(self, state, rows, images=None):
        return [m.select_state(s, rows, images) for m, s in zip(self.members, state)]

    def step(self, tokens, state):
        outs = [m.step(tokens, s) for m, s in zip(self.members, state)]
        probs = torch.stack([torch.softmax(o[0].float(), dim=1) for o in outs]).mean(0)
        alpha = torch.stack([o[1] for o in outs]).mean(0)
        return probs.log(), alpha, [o[2] for o in outs]


def endings(vocab: Vocabulary, device=None) -> Endings:
    """beam.Endings with torch tables on `device`."""
    return Endings(vocab, lambda a: torch.from_numpy(a).to(device))


def banned_words(vocab: Vocabulary, vocab_size: int, last: torch.Tensor, may_end: bool, *,
                 suppress_unk: bool = True, ends: Endings | None = None,
                 before: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, V) True where a word may not come next, given the previous words `last` (rows,) and the ones
    `before` them (None at the first word): <pad>, <start>, <unk> (when suppressed), <end> as the first word or
    where `ends` says the caption is unfinished ("... on a", "... on a white"), and the previous word again (see
    beam.py)."""
    ban = torch.zeros((len(last), vocab_size), dtype=torch.bool, device=last.device)
    ban[torch.arange(len(last), device=last.device), last] = True
    ban[:, [vocab.pad_id, vocab.start_id]] = True
    ban[:, vocab.unk_id] = suppress_unk
    if not may_end:  # an empty caption describes nothing
        ban[:, vocab.end_id] = True
    elif ends is not None:
        ban[:, vocab.end_id] = ends.unfinished(last, before)
    return ban


def _block_repeated_trigrams(logp: torch.Tensor, seqs: list[list[int]]) -> None:
    """Forbid any word that would repeat a trigram already in the hypothesis (stops 'a dog and a dog and...')."""
    for row, seq in enumerate(seqs):
        if len(seq) < 3:
            continue
        last = (seq[-2], seq[-1])
        for i in range(len(seq) - 2):
            if (seq[i], seq[i + 1]) == last:
                logp[row, seq[i + 2]] = -float("inf")


# --- the decoder step every search strategy takes ------------------------------------------------

def next_logprobs(model: ShowAttendTell, vocab: Vocabulary, tokens: torch.Tensor, state, *, may_end: bool,
                  suppress_unk: bool = True, ends: Endings | None = None, before: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None,
                  history: list[list[int]] | None = None, said: torch.Tensor | None = None,
                  repeat_cost: torch.Tensor | None = None, force_end: bool = False, renormalise: bool = False):
    """One decoder step for every row: previous words `tokens` (rows,) -> (log-probabilities (rows, V) of the
    next word with the banned words at -inf, attention (rows, R), next state).

    `bias` (rows, V) is added to the log-probabilities (grounded decoding); `history` (the words of each row so
    far) blocks repeated trigrams; `repeat_cost` (V,) is charged for the words each row has `said` (rows, V)
    already; `force_end` bans everything but <end>. Searches rank by the model's probabilities with the banned
    words cut out; sampling (`renormalise`) draws from a distribution over the allowed words alone, so the ban
    is applied before the softmax and the result stays differentiable."""
    logits, alpha, state = model.step(tokens, state)
    if force_end:
        ban = torch.ones(logits.size(1), dtype=torch.bool, device=logits.device)
        ban[vocab.end_id] = False
    else:
        ban = banned_words(vocab, logits.size(1), tokens, may_end, suppress_unk=suppress_unk, ends=ends,
                           before=before)
    if renormalise:
        logp = torch.log_softmax(logits.float().masked_fill(ban, -float("inf")), dim=1)
    else:
        logp = torch.log_softmax(logits.float(), dim=1).masked_fill_(ban, -float("inf"))
    if bias is not None:
        logp += bias
    if said is not None and repeat_cost is not None:
        logp -= said * repeat_cost
    if history is not None:
        _block_repeated_trigrams(logp, history)
    return logp, alpha, state


def _costs(vocab: Vocabulary, penalty: float, device) -> torch.Tensor | None:
    return torch.from_numpy(repeat_costs(vocab, penalty)).to(device) if penalty else None


# --- greedy ------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, *, max_len: int = 30,
           min_len: int = 1, suppress_unk: bool = True, block_trigrams: bool = True,
           block_bad_endings: bool = True, bias: torch.Tensor | None = None,
           repeat_penalty: float = REPEAT_PENALTY) -> list[Caption]:
    """The most likely word at every step. Plain and fast; used for dev scoring during training.
    `bias` (B, V) is added to each image's word log-probabilities (grounding.Grounding.word_bias); a word
    said again costs `repeat_penalty` (beam.REPEATABLE words excepted; with `block_trigrams` only)."""
    model.eval()
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), vocab.start_id, dtype=torch.long, device=features.device)
    seqs: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    alive = list(range(B))  # image of each remaining row
    ends = endings(vocab, features.device) if block_bad_endings else None
    costs = _costs(vocab, repeat_penalty, features.device) if block_trigrams else None
    said = torch.zeros((B, model.vocab_size), dtype=torch.bool, device=features.device)
    for t in range(max_len):
        before = None if ends is None or t < 2 else torch.tensor([seqs[i][-2] for i in alive], device=features.device)
        logp, _, state = next_logprobs(
            model, vocab, tokens, state, may_end=t >= min_len, suppress_unk=suppress_unk, ends=ends, before=before,
            bias=None if bias is None else bias.to(features.device)[alive],
            history=[seqs[i] for i in alive] if block_trigrams else None, said=said[alive], repeat_cost=costs)
        best, words = logp.max(dim=1)
        said[alive, words] = True
        keep = []
        for row, (img, w, s) in enumerate(zip(alive, words.tolist(), best.tolist())):
            scores[img] += s
            if w != vocab.end_id:
                seqs[img].append(w)
                keep.append(row)
        if not keep:
            break
        rows = torch.tensor(keep, device=features.device)
        alive = [alive[r] for r in keep]
        state, tokens = model.select_state(state, rows, rows), words.index_select(0, rows)
    return [Caption(vocab.decode(s), sc) for s, sc in zip(seqs, scores)]


# --- beam search ---------------------------------------------------------------------------------------

class _Finished:
    """The ended hypotheses of every image: (score, word ids, attention or None), scores length-normalised."""

    def __init__(self, n_images: int, beam_size: int, length_norm: float):
        self.hyps: list[list[tuple[float, list[int], np.ndarray | None]]] = [[] for _ in range(n_images)]
        self.beam_size, self.length_norm = beam_size, length_norm

    def add(self, image: int, score: float, seq: list[int], attention: np.ndarray | None) -> None:
        if self.length_norm:
            score = score / (len(seq) + 1) ** self.length_norm
        self.hyps[image].append((score, seq, attention))

    def done(self, image: int) -> bool:
        """An image's search is over once it has `beam_size` ended hypotheses."""
        return len(self.hyps[image]) >= self.beam_size

    def best(self, vocab: Vocabulary, n_best: int) -> list[list[Caption]]:
        return [[Caption(vocab.decode(seq), score, None if att is None else att[:len(seq)])
                 for score, seq, att in sorted(hyps, key=lambda h: -h[0])[:n_best]] for hyps in self.hyps]


class _Beams:
    """The live hypotheses: K rows per image still searching (row b*K + k is beam k of block b), their
    scores (blocks, K), words so far and, when asked, attention so far."""

    def __init__(self, model, vocab: Vocabulary, features: torch.Tensor, beam_size: int, keep_attention: bool):
        B, K, device = features.size(0), beam_size, features.device
        self.model, self.K, self.V, self.device = model, K, model.vocab_size, device
        self.keep_attention = keep_attention
        self.end_id = vocab.end_id
        self.state = model.select_state(model.init_state(features), torch.arange(B, device=device).repeat_interleave(K))
        self.tokens = torch.full((B * K,), vocab.start_id, dtype=torch.long, device=device)
        # Only the first beam of each image is live at the start, so the K beams do not start identical.
        self.scores = torch.full((B, K), -float("inf"), device=device)
        self.scores[:, 0] = 0.0
        self.seqs = torch.zeros((B * K, 0), dtype=torch.long, device=device)
        self.said = torch.zeros((B * K, self.V), dtype=torch.bool, device=device)  # the words in each row's seqs
        self.attn = torch.zeros((B * K, 0, features.size(1)), device=device)
        self.images = list(range(B))  # original image of each block still searching

    def advance(self, logp: torch.Tensor, alpha: torch.Tensor, finished: _Finished) -> None:
        """Extend every beam by the K best of its image's K x V candidates; those that end are finished."""
        K, V = self.K, self.V
        total = (self.scores.view(-1, 1) + logp).view(len(self.images), K * V)
        # 2K candidates always leave K that do not end (each beam has a single <end> candidate).
        cand_scores, cand = total.topk(2 * K, dim=1)
        beam, word = cand // V, cand % V
        ended = word == self.end_id
        # Ended candidates ranked inside the top K become finished hypotheses.
        for b, k in (ended[:, :K] & torch.isfinite(cand_scores[:, :K])).nonzero().tolist():
            row = b * K + beam[b, k].item()
            att = None
            if self.keep_attention:
                att = np.concatenate([self.attn[row].cpu().numpy(), alpha[row:row + 1].cpu().numpy()], 0)
            finished.add(self.images[b], cand_scores[b, k].item(), self.seqs[row].tolist(), att)
        # The K best candidates that do not end carry on (stable sort keeps their rank order).
        rank = ended.long() * (2 * K) + torch.arange(2 * K, device=self.device)
        keep = rank.argsort(dim=1)[:, :K]
        self.scores = cand_scores.gather(1, keep)
        blocks = torch.arange(len(self.images), device=self.device)
        src_rows = (blocks.unsqueeze(1) * K + beam.gather(1, keep)).view(-1)
        self.tokens = word.gather(1, keep).view(-1)
        self.seqs = torch.cat([self.seqs.index_select(0, src_rows), self.tokens.unsqueeze(1)], 1)
        self.said = self.said.index_select(0, src_rows)
        self.said[torch.arange(len(self.tokens), device=self.device), self.tokens] = True
        if self.keep_attention:
            self.attn = torch.cat([self.attn.index_select(0, src_rows),
                                   alpha.index_select(0, src_rows).unsqueeze(1)], 1)
        self.state = self.model.select_state(self.state, src_rows)

    def finish_live(self, finished: _Finished) -> None:
        """Out of length: the live beams of every unfinished image compete as they are."""
        for b, img in enumerate(self.images):
            if finished.done(img):
                continue
            for k in range(self.K):
                if torch.isfinite(self.scores[b, k]):
                    row = b * self.K + k
                    finished.add(img, self.scores[b, k].item(), self.seqs[row].tolist(),
                                  self.attn[row].cpu().numpy() if self.keep_attention else None)

    def drop_done(self, finished: _Finished) -> bool:
        """Images whose search is over leave the batch. Returns whether any image is still searching."""
        done = [finished.done(img) for img in self.images]
        if not any(done):
            return True
        blocks = [b for b, d in enumerate(done) if not d]
        if not blocks:
            return False
        K, device = self.K, self.device
        rows = (torch.tensor(blocks, device=device).unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
        self.images = [self.images[b] for b in blocks]
        self.scores = self.scores[blocks]
        self.state = self.model.select_state(self.state, rows, torch.tensor(blocks, device=self.device))
        self.tokens, self.seqs, self.said = self.tokens[rows], self.seqs[rows], self.said[rows]
        if self.keep_attention:
            self.attn = self.attn[rows]
        return True


@torch.no_grad()
def decode(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, *, beam_size: int = 1,
           max_len: int = 30, min_len: int = 1, n_best: int = 1, length_norm: float = 0.0,
           suppress_unk: bool = True, block_trigrams: bool = True, block_bad_endings: bool = True,
           return_attention: bool = False, bias: torch.Tensor | None = None,
           repeat_penalty: float = REPEAT_PENALTY) -> list[list[Caption]]:
    """Beam search over a batch of images; returns, per image, the n best captions best first.

    A hypothesis ends when it emits <end>; an image is done once it has `beam_size` ended ones.
    If none ended within max_len, its best unfinished hypotheses are returned, so every image gets a
    caption of at least `min_len` words. `length_norm` a ranks by score / (words + 1) ** a (0 = raw
    log-probability). `bias` (B, V) is added to each image's word log-probabilities (grounded decoding); a word
    said again costs `repeat_penalty` (beam.REPEATABLE words excepted; with `block_trigrams` only).
    """
    model.eval()
    beams = _Beams(model, vocab, features, beam_size, return_attention)
    finished = _Finished(features.size(0), beam_size, length_norm)
    ends = endings(vocab, features.device) if block_bad_endings else None
    costs = _costs(vocab, repeat_penalty, features.device) if block_trigrams else None
    for t in range(max_len):
        logp, alpha, beams.state = next_logprobs(
            model, vocab, beams.tokens, beams.state, may_end=t >= min_len, suppress_unk=suppress_unk,
            ends=ends, before=beams.seqs[:, -2] if t >= 2 else None,
            bias=None if bias is None else bias.to(features.device)[beams.images].repeat_interleave(beam_size, 0),
            history=beams.seqs.tolist() if block_trigrams and t >= 2 else None, said=beams.said, repeat_cost=costs)
        beams.advance(logp, alpha, finished)
        if t == max_len - 1:
            beams.finish_live(finished)
        elif not beams.drop_done(finished):
            break
    return finished.best(vocab, min(n_best, beam_size))


# --- sampling, for self-critical training ------------------------------------------------------------

def sample(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, n: int, *, max_len: int = 30):
    """Draw n captions per image from the model's own distribution, keeping the graph: the policy
    samples of self-critical training. Runs in whatever mode the model is in (train: with dropout).

    Returns words (B*n, T) (rows of image b are b*n .. b*n+n-1), the log-probability of each drawn word
    (B*n, T), differentiable, and a mask (B*n, T) of the steps that count (words and the <end>).
    The same words are banned as in decoding (<pad>, <start>, <unk>; <end> first or where beam.Endings says the
    caption is unfinished)."""
    B, device = features.size(0), features.device
    state = model.select_state(model.init_state(features), torch.arange(B, device=device).repeat_interleave(n))
    tokens = torch.full((B * n,), vocab.start_id, dtype=torch.long, device=device)
    ends = endings(vocab, device)
    alive = torch.ones(B * n, dtype=torch.bool, device=device)
    words, logps, masks = [], [], []
    for t in range(max_len + 1):  # max_len words, then <end> is forced
        logp, _, state = next_logprobs(model, vocab, tokens, state, may_end=t > 0, ends=ends,
                                       before=words[-2] if t >= 2 else None, force_end=t == max_len,
                                       renormalise=True)
        word = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        word = torch.where(alive, word, torch.full_like(word, vocab.pad_id))
        words.append(word)
        drawn = logp.gather(1, word.unsqueeze(1)).squeeze(1)
        logps.append(torch.where(alive, drawn, torch.zeros_like(drawn)))  # finished rows drew a banned <pad>
        masks.append(alive)
        alive = alive & (word != vocab.end_id)
        if not alive.any():
            break
        tokens = word
    return torch.stack(words, 1), torch.stack(logps, 1), torch.stack(masks, 1).float()
