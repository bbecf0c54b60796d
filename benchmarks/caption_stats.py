"""What a set of generated captions looks like: length, diversity, <unk>, dangling endings, people and colours.

    python benchmarks/caption_stats.py runs/ship/dev-beam3/captions.json [more captions.json ...]

Reads COCO results files (`captioner evaluate` writes them as captions.json) and prints one line each.
"""
import argparse
import json
import re

from captioner.decode import BAD_ENDINGS

PEOPLE = re.compile(r"\b(man|woman|boy|girl|men|women|boys|girls)\b")
COLOURS = re.compile(r"\b(red|blue|green|yellow|white|black|pink|orange|purple|brown|gray|grey)\b")


def stats(captions: list[str]) -> dict:
    n = len(captions)
    lengths = [len(c.split()) for c in captions]
    return {"captions": n, "distinct": len(set(captions)), "mean_words": round(sum(lengths) / n, 2),
            "max_words": max(lengths), "with_unk": sum("<unk>" in c for c in captions),
            "dangling_end": sum(bool(c.split()) and c.split()[-1] in BAD_ENDINGS for c in captions),
            "gendered_pct": round(100 * sum(bool(PEOPLE.search(c)) for c in captions) / n, 1),
            "colour_pct": round(100 * sum(bool(COLOURS.search(c)) for c in captions) / n, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            captions = [r["caption"] for r in json.load(f)]
        print(path, json.dumps(stats(captions)))


if __name__ == "__main__":
    main()
