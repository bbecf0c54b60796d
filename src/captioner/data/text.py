"""Caption text normalisation, shared by training text and metric references.

One documented rule, close to what the COCO PTB tokenizer plus punctuation removal gives,
but with no Java and no per-call cost:
  1. Unicode NFKC (full-width letters, ligatures and the like become plain ones), then lowercase.
  2. Apostrophes are deleted, joining the word: "dog's" -> "dogs", "don't" -> "dont".
     (PTB would give "dog 's"; deleting keeps one token per word and matches the widely used
     Karpathy/neuraltalk preprocessing.)
  3. Every other punctuation or symbol character (hyphens included) becomes a space:
     "t-shirt" -> "t shirt", "a dog." -> "a dog".
  4. Letters and digits are kept as they are ("2 dogs" stays "2 dogs"); whitespace is collapsed.
"""
from __future__ import annotations

import unicodedata

# straight, curly and modifier apostrophes, plus the backtick people type for one
_APOSTROPHES = frozenset("'\u2018\u2019\u02bc`\u00b4")


def _clean_char(ch: str) -> str:
    if ch in _APOSTROPHES:
        return ""
    cat = unicodedata.category(ch)
    # P* = punctuation, S* = symbols, Z*/C* = separators and control characters (tabs, newlines)
    if cat[0] in "PSZC":
        return " "
    return ch


def normalize(caption: str) -> str:
    """Return the canonical form of a caption: lowercase words and numbers separated by single spaces."""
    text = unicodedata.normalize("NFKC", caption).lower()
    return " ".join("".join(_clean_char(ch) for ch in text).split())


def tokenize(caption: str) -> list[str]:
    return normalize(caption).split()
