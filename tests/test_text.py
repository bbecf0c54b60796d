import pytest

from captioner.data.text import normalize, tokenize


@pytest.mark.parametrize("raw, expected", [
    ("A dog runs .", "a dog runs"),
    ("The dog's ball", "the dogs ball"),                 # apostrophes join the word
    ("don\u2019t stop", "dont stop"),                    # curly apostrophe too
    ("a t-shirt and a well-known man", "a t shirt and a well known man"),  # hyphens split
    ("two  dogs,\tthree cats!\n", "two dogs three cats"),
    ("Ｔｗｏ ＤＯＧＳ", "two dogs"),                        # NFKC folds full-width letters
    ("3 men in 1990s cars", "3 men in 1990s cars"),      # numbers kept
    ("\"quoted\" (parens) [x] a/b", "quoted parens x a b"),
    ("café Über", "café über"),                          # letters with accents are letters
    ("   ", ""),
    ("...", ""),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_normalize_is_idempotent():
    s = "A man's T-shirt, blue & white -- 2 dogs!"
    assert normalize(normalize(s)) == normalize(s)


def test_tokenize_splits_normalized_text():
    assert tokenize("A black-and-white dog's toy.") == ["a", "black", "and", "white", "dogs", "toy"]
    assert tokenize("") == []
