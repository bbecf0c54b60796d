"""Word <-> id mapping built from the training captions only."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioner.io import atomic_write_json, read_json


class Vocabulary:
    PAD = "<pad>"
    START = "<start>"
    END = "<end>"
    UNK = "<unk>"
    SPECIALS = (PAD, START, END, UNK)  # their positions are the ids below
    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, itos: Sequence[str]):
        if tuple(itos[:4]) != self.SPECIALS:
            raise ValueError(f"vocabulary must start with {list(self.SPECIALS)}, got {list(itos[:4])}")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 5) -> "Vocabulary":
        """Keep words seen at least min_count times; order by count, then word, so builds are reproducible."""
        counts = Counter(w for tokens in token_lists for w in tokens)
        for s in cls.SPECIALS:
            counts.pop(s, None)  # a caption that literally says "<unk>" must not shift the special ids
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*cls.SPECIALS, *words])

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """[start, word ids (unknown -> unk, at most max_len of them), end]."""
        if max_len is not None:
            tokens = tokens[:max_len]
        unk = self.unk_id
        return [self.start_id, *(self.stoi.get(w, unk) for w in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first end; start and pad are skipped, unknown stays "<unk>"."""
        words = []
        for i in ids:
            i = int(i)  # accept numpy / torch integers
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else self.UNK)
        return words

    def unk_rate(self, token_lists: Iterable[Sequence[str]]) -> float:
        """Fraction of tokens that would encode to <unk> (0.0 for no tokens)."""
        total = unknown = 0
        for tokens in token_lists:
            total += len(tokens)
            unknown += sum(w not in self.stoi for w in tokens)
        return unknown / total if total else 0.0

    def to_dict(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if not isinstance(d, dict) or not isinstance(d.get("itos"), list):
            raise ValueError("vocabulary: expected an object with an 'itos' list")
        return cls(d["itos"])

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        try:
            return cls.from_dict(read_json(path))
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a vocabulary file ({e})") from None
