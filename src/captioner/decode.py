"""Turning image features into words: greedy and beam search, batched over many images.

Beams live in the batch dimension (rows = images x beams) so one `model.step` call advances every
hypothesis of every image at once; images whose search is over leave the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


@dataclass
class Caption:
    tokens: list[str]
    score: float  # sum of log-probabilities (length-normalised when asked)
    attention: np.ndarray | None = None  # (len(tokens), R): where the model looked for each word

    @property
    def text(self) -> str:
        return " ".join(self.tokens)


# A caption must not stop on these words ("a baby is playing in a pile of"); CIDEr-D barely punishes such
# endings, so self-critical training would otherwise learn them.
BAD_ENDINGS = frozenset("a an the and in for at of with before after on upon near to is are am".split())


def bad_ending_ids(vocab: Vocabulary, device=None) -> torch.Tensor:
    return torch.tensor(sorted(vocab.stoi[w] for w in BAD_ENDINGS if w in vocab.stoi), dtype=torch.long,
                        device=device)


def banned_words(vocab: Vocabulary, vocab_size: int, last: torch.Tensor, may_end: bool, *,
                 suppress_unk: bool = True, bad_ends: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, V) True where a word may not come next, given the previous words `last` (rows,): <pad>,
    <start>, <unk> (when suppressed), and <end> as the first word or right after a BAD_ENDINGS word."""
    ban = torch.zeros(vocab_size, dtype=torch.bool, device=last.device)
    ban[[vocab.pad_id, vocab.start_id]] = True
    ban[vocab.unk_id] = suppress_unk
    ban = ban.expand(len(last), -1).clone()
    if not may_end:  # an empty caption describes nothing
        ban[:, vocab.end_id] = True
    elif bad_ends is not None and len(bad_ends):
        ban[torch.isin(last, bad_ends), vocab.end_id] = True
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


@torch.no_grad()
def greedy(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, *, max_len: int = 30,
           min_len: int = 1, suppress_unk: bool = True, block_trigrams: bool = True,
           block_bad_endings: bool = True, bias: torch.Tensor | None = None) -> list[Caption]:
    """The most likely word at every step. Plain and fast; used for dev scoring during training.
    `bias` (B, V) is added to each image's word log-probabilities (grounding.Grounding.word_bias)."""
    model.eval()
    B = features.size(0)
    state = model.init_state(features)
    tokens = torch.full((B,), vocab.start_id, dtype=torch.long, device=features.device)
    seqs: list[list[int]] = [[] for _ in range(B)]
    scores = [0.0] * B
    alive = list(range(B))  # image of each remaining row
    bad_ends = bad_ending_ids(vocab, features.device) if block_bad_endings else None
    for t in range(max_len):
        logits, _, state = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=1).masked_fill_(
            banned_words(vocab, logits.size(1), tokens, t >= min_len, suppress_unk=suppress_unk, bad_ends=bad_ends),
            -float("inf"))
        if bias is not None:
            logp += bias.to(logp.device)[alive]
        if block_trigrams:
            _block_repeated_trigrams(logp, [seqs[i] for i in alive])
        best, words = logp.max(dim=1)
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


@torch.no_grad()
def decode(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, *, beam_size: int = 1,
           max_len: int = 30, min_len: int = 1, n_best: int = 1, length_norm: float = 0.0,
           suppress_unk: bool = True, block_trigrams: bool = True, block_bad_endings: bool = True,
           return_attention: bool = False, bias: torch.Tensor | None = None) -> list[list[Caption]]:
    """Beam search over a batch of images; returns, per image, the n best captions best first.

    A hypothesis ends when it emits <end>; an image is done once it has `beam_size` ended ones.
    If none ended within max_len, its best unfinished hypotheses are returned, so every image gets a
    caption of at least `min_len` words. `length_norm` a ranks by score / (words + 1) ** a (0 = raw
    log-probability). `bias` (B, V) is added to each image's word log-probabilities (grounded decoding).
    """
    model.eval()
    K, V, dev = beam_size, model.vocab_size, features.device
    B = features.size(0)
    n_best = min(n_best, K)

    state = model.select_state(model.init_state(features), torch.arange(B, device=dev).repeat_interleave(K))
    tokens = torch.full((B * K,), vocab.start_id, dtype=torch.long, device=dev)
    # Only the first beam of each image is live at the start, so the K beams do not start identical.
    beam_scores = torch.full((B, K), -float("inf"), device=dev)
    beam_scores[:, 0] = 0.0
    seqs = torch.zeros((B * K, 0), dtype=torch.long, device=dev)
    attn = torch.zeros((B * K, 0, features.size(1)), device=dev)
    images = list(range(B))  # original image of each row block still searching
    finished: list[list[tuple[float, list[int], np.ndarray | None]]] = [[] for _ in range(B)]

    def finish(img, score, seq, att):
        norm = score / (len(seq) + 1) ** length_norm if length_norm else score
        finished[img].append((norm, seq, att))

    bad_ends = bad_ending_ids(vocab, dev) if block_bad_endings else None
    for t in range(max_len):
        logits, alpha, state = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=1).masked_fill_(
            banned_words(vocab, logits.size(1), tokens, t >= min_len, suppress_unk=suppress_unk, bad_ends=bad_ends),
            -float("inf"))
        if bias is not None:
            logp += bias.to(dev)[images].repeat_interleave(K, 0)
        if block_trigrams and t >= 2:
            _block_repeated_trigrams(logp, seqs.tolist())
        total = (beam_scores.view(-1, 1) + logp).view(len(images), K * V)
        # 2K candidates always leave K that do not end (each beam has a single <end> candidate).
        cand_scores, cand = total.topk(2 * K, dim=1)
        beam, word = cand // V, cand % V
        ended = word == vocab.end_id

        # Ended candidates ranked inside the top K become finished hypotheses.
        for b, k in (ended[:, :K] & torch.isfinite(cand_scores[:, :K])).nonzero().tolist():
            row = b * K + beam[b, k].item()
            att = attn[row].cpu().numpy() if return_attention else None
            if att is not None:
                att = np.concatenate([att, alpha[row:row + 1].cpu().numpy()], 0)
            finish(images[b], cand_scores[b, k].item(), seqs[row].tolist(), att)

        # The K best candidates that do not end carry on (stable sort keeps their rank order).
        rank = ended.long() * (2 * K) + torch.arange(2 * K, device=dev)
        keep = rank.argsort(dim=1)[:, :K]
        beam_scores = cand_scores.gather(1, keep)
        src_rows = (torch.arange(len(images), device=dev).unsqueeze(1) * K + beam.gather(1, keep)).view(-1)
        tokens = word.gather(1, keep).view(-1)
        seqs = torch.cat([seqs.index_select(0, src_rows), tokens.unsqueeze(1)], 1)
        if return_attention:
            attn = torch.cat([attn.index_select(0, src_rows), alpha.index_select(0, src_rows).unsqueeze(1)], 1)
        state = model.select_state(state, src_rows)

        done = [len(finished[img]) >= K for img in images]
        if t == max_len - 1:  # out of length: the live beams compete as they are
            for b, img in enumerate(images):
                if not done[b]:
                    for k in range(K):
                        if torch.isfinite(beam_scores[b, k]):
                            row = b * K + k
                            finish(img, beam_scores[b, k].item(), seqs[row].tolist(),
                                   attn[row].cpu().numpy() if return_attention else None)
            break
        if any(done):
            blocks = [b for b, d in enumerate(done) if not d]
            if not blocks:
                break
            rows = (torch.tensor(blocks, device=dev).unsqueeze(1) * K + torch.arange(K, device=dev)).view(-1)
            images = [images[b] for b in blocks]
            beam_scores = beam_scores[blocks]
            state = model.select_state(state, rows, torch.tensor(blocks, device=dev))
            tokens, seqs = tokens[rows], seqs[rows]
            if return_attention:
                attn = attn[rows]

    results = []
    for img in range(B):
        hyps = sorted(finished[img], key=lambda h: -h[0])[:n_best]
        results.append([Caption(vocab.decode(seq), score, None if att is None else att[:len(seq)])
                        for score, seq, att in hyps])
    return results


def sample(model: ShowAttendTell, vocab: Vocabulary, features: torch.Tensor, n: int, *, max_len: int = 30):
    """Draw n captions per image from the model's own distribution, keeping the graph: the policy
    samples of self-critical training. Runs in whatever mode the model is in (train: with dropout).

    Returns words (B*n, T) (rows of image b are b*n .. b*n+n-1), the log-probability of each drawn word
    (B*n, T), differentiable, and a mask (B*n, T) of the steps that count (words and the <end>).
    The same words are banned as in decoding (<pad>, <start>, <unk>; <end> first or after a BAD_ENDINGS word)."""
    B, dev = features.size(0), features.device
    state = model.select_state(model.init_state(features), torch.arange(B, device=dev).repeat_interleave(n))
    tokens = torch.full((B * n,), vocab.start_id, dtype=torch.long, device=dev)
    bad_ends = bad_ending_ids(vocab, dev)
    only_end = torch.ones(model.vocab_size, dtype=torch.bool, device=dev)
    only_end[vocab.end_id] = False
    alive = torch.ones(B * n, dtype=torch.bool, device=dev)
    words, logps, masks = [], [], []
    for t in range(max_len + 1):  # max_len words, then <end> is forced
        logits, _, state = model.step(tokens, state)
        ban = only_end if t == max_len else banned_words(vocab, model.vocab_size, tokens, t > 0, bad_ends=bad_ends)
        logp = torch.log_softmax(logits.float().masked_fill(ban, -float("inf")), dim=1)
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
