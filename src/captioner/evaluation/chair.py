"""Object hallucination the way CHAIR measures it (Rohrbach et al. 2018), from the reference captions.

The objects are COCO's 80 classes with their synonyms (data/objects.py). For one image:
- an object is *in the image* when at least `min_refs` (2) of its references name it;
- an object the caption names is *false* when none of the references names it (an object only one person
  mentioned is neither required nor counted false).
CHAIR-i = false objects / objects named (each class once per caption), CHAIR-s = captions naming a false object
/ captions, recall = objects in the image that the caption names / objects in the image.
"""
from __future__ import annotations

from collections import Counter

from captioner.data.objects import find_objects, object_classes

CHAIR_KEYS = ("chair_i", "chair_s", "object_recall")


def chair_image(caption: str, references: list[str], min_refs: int = 2) -> dict:
    votes = Counter(c for ref in references for c in object_classes(ref))
    named = {}
    for word, cls in find_objects(caption):
        named.setdefault(cls, word)
    present = {c for c, n in votes.items() if n >= min_refs}
    false = sorted(c for c in named if votes[c] == 0)
    return {"named": sorted(named), "false": false, "false_words": sorted(named[c] for c in false),
            "present": sorted(present), "found": sorted(present & set(named))}


def chair(candidates: dict[str, str], references: dict[str, list[str]], min_refs: int = 2) -> tuple[dict, dict]:
    """Corpus figures {chair_i, chair_s, object_recall} and the per-image breakdown."""
    per_image = {k: chair_image(c, references[k], min_refs) for k, c in candidates.items()}
    named = sum(len(v["named"]) for v in per_image.values())
    false = sum(len(v["false"]) for v in per_image.values())
    present = sum(len(v["present"]) for v in per_image.values())
    found = sum(len(v["found"]) for v in per_image.values())
    n = max(1, len(per_image))
    corpus = {"chair_i": false / named if named else 0.0,
              "chair_s": sum(bool(v["false"]) for v in per_image.values()) / n,
              "object_recall": found / present if present else 0.0}
    return corpus, per_image
