"""Caption metrics computed exactly the way the COCO caption toolkit computes them.

We call pycocoevalcap's own scorers (never COCOEvalCap.evaluate(), whose SPICE step downloads
Stanford models at run time) on captions tokenised the toolkit's way:

- tokenisation: Stanford PTBTokenizer (Java, `-preserveLines -lowerCase`) followed by the toolkit's
  punctuation filter. Without Java, `ptb_tokenize` below reproduces it in pure Python (checked token
  for token on all 40,460 Flickr8k captions by tests/test_metrics.py).
- bleu1..bleu4: `Bleu(4)`, corpus-level BLEU with the "closest" reference length (the clipped n-gram
  counts and lengths are summed over the corpus first; it is not an average of sentence BLEUs).
- meteor: METEOR 1.5 (`Meteor`, the jar shipped with pycocoevalcap, `-l en -norm`); needs Java.
- rougeL: `Rouge`, ROUGE-L F-measure with beta=1.2, averaged over images.
- cider: `Cider` from pycocoevalcap.cider, which is what the toolkit reports as "CIDEr". Despite the
  name it is CIDEr-D (Vedantam et al. 2015): tf-idf n-gram vectors for n=1..4, candidate counts
  clipped by the reference counts, a Gaussian length penalty with sigma=6, no stemming, times 10,
  with idf taken from the references of the images being scored (the "corpus" df mode of the
  reference CIDEr-D code). pycocoevalcap 1.2 ships no other CIDEr-D class.
All scores are on the toolkit's own scale (0-1 except cider, which is 0-10).
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rougeL", "cider")
UNK = "<unk>"
# <unk> in a candidate becomes this word, which no reference can contain (checked at scoring time),
# so an unknown word never matches anything: not in BLEU/CIDEr/ROUGE, nor in METEOR's stem or
# synonym stages (it is no English word).
_UNK_STANDIN = "xxunkxx"


@dataclass
class Scores:
    corpus: dict                                   # METRIC_KEYS -> float (meteor None when unavailable)
    per_image: dict = field(default_factory=dict)  # image id -> {metric: float}
    notes: list = field(default_factory=list)      # one line per thing the reader should know
    tokenizer: str = ""                            # "ptb-java" or "ptb-python"


# -----------------------------------------------------------------------------
# tokenisation

# Stanford PTBLexer rules that occur in English captions, in the lexer's priority order. Each
# alternative is one token; anything else non-blank is a one-character token.
_TITLES = ("Mr|Mrs|Ms|Messrs|Miss|Drs?|Profs?|Sens?|Reps?|Lt|Col|Gen|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt"
           "|Ste?|Mt|Ave|Pres|Hon|Jr|Sr|Bros|Blvd|Rd|Esq|Co|Corp|Inc|Ltd|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?"
           "|Oct|Nov|Dec|etc|vs")
_TOKEN = re.compile(rf"""
    [^\W_][\w-]*(?:\.[^\W_][\w-]*)*\.(?:com|org|net|edu|gov|info|biz|io)(?![^\W_])  # domain names
  | (?:[^\W\d_]\.){{2,}}                          # acronyms with periods: D.C.  S.C.U.B.A.
  | (?<![^\W_])(?i:{_TITLES})\.                   # titles and other known abbreviations: Mr.  st.
  | (?<![^\W_])[A-Z]\.                             # an initial: U.  P.
  | </?[A-Za-z][^<>\s]*>                          # SGML-like tags: <unk>
  | '[nN]'?(?![^\W_])                              # rock 'n' roll
  | (?<![^\W_])[yY]'(?=all(?![^\W_]))              # y'all -> y' all
  | (?<![^\W_])[A-HJ-XZa-hj-xz]'[^\W\d_]{{2,}}     # o'clock, O'Brien (but not I've, y'all)
  | '(?:[sSdDmM]|re|RE|ve|VE|ll|LL)(?![^\W_])      # clitics: 's 're 've 'd 'll 'm
  | [nN]'[tT](?![^\W_])                            # n't
  | [A-Z]+&[A-Z]+(?![^\W_])                        # AT&T
  | \d+(?:[.,:]\d+)+                               # 1,000  3.5  10:30
  | [^\W_]+(?:-[^\W_]+)*                           # words, hyphenated words kept whole: t-shirt
  | \.\.\.|--                                      # ellipsis, dash
  | \S                                             # any other single character
""", re.VERBOSE)
# splits PTBLexer makes inside words before the rules above see them
_SPLITS = [
    (re.compile(r"([^\W_])([nN]'[tT])(?![^\W_])"), r"\1 \2"),                    # don't -> do n't
    (re.compile(r"([^\W_])('(?:[sSdDmM]|re|RE|ve|VE|ll|LL))(?![^\W_])"), r"\1 \2"),  # dog's -> dog 's
    (re.compile(r"([^\W_])('[nN]')(?=[^\W_])"), r"\1 \2 "),                      # rock'n'roll
    (re.compile(r"\b([Cc]an)(not)\b"), r"\1 \2"),                                 # cannot -> can not
    (re.compile(r"\b([Gg]on|[Gg]ot|[Ww]an)(na|ta)\b"), r"\1 \2"),                  # gonna -> gon na
    (re.compile(r"\b([Ll]em|[Gg]im)(me)\b"), r"\1 \2"),                           # gimme -> gim me
]
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB's quote and dash normalisation, then the toolkit drops them as punctuation anyway
_NORMALISE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " ",
                            "\u2013": " -- ", "\u2014": " -- ", "`": "'"})
_DROP = set(PUNCTUATIONS) | {'"'}


def ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for the toolkit's Java PTBTokenizer + punctuation filter.

    Returns the space-joined lowercase tokens, e.g. "A dog's ball (red)." -> "a dog 's ball -lrb- red -rrb-"
    (like the toolkit it keeps the bracket tokens, because its filter only drops them in upper case).
    """
    text = text.translate(_NORMALISE)
    for pattern, repl in _SPLITS:
        text = pattern.sub(repl, text)
    tokens = (_BRACKETS.get(t, t).lower() for t in _TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in _DROP)


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize_captions(captions: dict[str, list[str]], tokenizer: str = "auto") -> tuple[dict[str, list[str]], str]:
    """Tokenise {id: [captions]} (references or candidates) the toolkit's way, for scoring (data.text.tokenize
    is the training text's). tokenizer: "auto" | "java" | "python".

    Returns the tokenised dict (same keys, same order) and the name of the tokenizer used.
    """
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'java' or 'python', not {tokenizer!r}")
    if tokenizer == "java" and not java_available():
        raise RuntimeError("the PTB tokenizer needs Java: no `java` on PATH")
    if tokenizer == "python" or not java_available():
        return {k: [ptb_tokenize(c) for c in caps] for k, caps in captions.items()}, "ptb-python"
    # The Java tokenizer works line by line: any line or paragraph separator inside a caption would
    # shift every later caption onto the wrong image, so collapse all whitespace first.
    ptb_input = {k: [{"caption": " ".join(c.split())} for c in caps] for k, caps in captions.items()}
    try:
        out = PTBTokenizer().tokenize(ptb_input)
    except OSError:  # it writes its temp file next to its jar: a read-only install cannot
        if tokenizer == "java":
            raise
        return {k: [ptb_tokenize(c) for c in caps] for k, caps in captions.items()}, "ptb-python"
    if any(len(out.get(k, [])) != len(caps) for k, caps in captions.items()):
        raise RuntimeError("PTBTokenizer returned a different number of captions than it was given")
    return {k: out[k] for k in captions}, "ptb-java"


# -----------------------------------------------------------------------------
# scoring

def _meteor(gts, res):
    """METEOR 1.5 via the toolkit's jar. Returns (corpus, per-image list) or raises with the reason."""
    from pycocoevalcap.meteor.meteor import Meteor
    meteor = Meteor()
    try:
        score, scores = meteor.compute_score(gts, res)
    finally:
        # stop the JVM now rather than whenever the garbage collector gets to it
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return score, scores


def _tokenized(candidates: dict[str, str], references: dict[str, list[str]], ids: list[str], tokenizer: str):
    """(references, candidates, tokenizer used), tokenised for the scorers: {id: [captions]} each."""
    # <unk> -> a stand-in word before tokenising, so the tokenizer cannot split it into "unk"
    unk = re.compile(rf"(?<!\S){re.escape(UNK)}(?!\S)")
    res = {k: [unk.sub(_UNK_STANDIN, candidates[k])] for k in ids}
    gts = {k: list(references[k]) for k in ids}
    res, used = tokenize_captions(res, tokenizer)
    gts, _ = tokenize_captions(gts, tokenizer)
    ref_words = {w for caps in gts.values() for c in caps for w in c.split()}
    standin = _UNK_STANDIN
    while standin in ref_words:  # a reference could in principle contain it: pick a fresh word
        standin += "x"
    if standin != _UNK_STANDIN:
        res = {k: [" ".join(standin if w == _UNK_STANDIN else w for w in c.split()) for c in caps]
               for k, caps in res.items()}
    return gts, res, used


def score_captions(candidates: dict[str, str], references: dict[str, list[str]], *,
                   tokenizer: str = "auto", meteor: bool = True) -> Scores:
    """Score one candidate caption per image against that image's references, the COCO-toolkit way.

    meteor=False skips METEOR (its JVM takes ~8 s to load the paraphrase table), e.g. for a quick
    dev-set score during training; it is then None with a note saying so.

    Scores every image in `candidates`; each must have at least one reference (else ValueError
    naming them). References of images without a candidate are ignored.
    """
    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = [k for k in candidates if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} candidate image(s) have no references, e.g. {missing[:3]}")
    ids = list(candidates)
    notes = []
    gts, res, used = _tokenized(candidates, references, ids, tokenizer)

    corpus, per_image = {}, {k: {} for k in ids}
    bleu, bleu_img = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"bleu{n + 1}"] = float(bleu[n])
        for k, s in zip(ids, bleu_img[n]):
            per_image[k][f"bleu{n + 1}"] = float(s)

    if not meteor:
        corpus["meteor"] = None
        notes.append("METEOR not computed (meteor=False)")
    elif not java_available():
        corpus["meteor"] = None
        notes.append("METEOR unavailable: java not found on PATH")
    else:
        try:
            m, m_img = _meteor(gts, res)
            corpus["meteor"] = float(m)
            for k, s in zip(ids, m_img):
                per_image[k]["meteor"] = float(s)
        except Exception as e:  # a JVM that cannot start (memory, broken install) must not lose the rest
            corpus["meteor"] = None
            notes.append(f"METEOR unavailable: {type(e).__name__}: {e}".splitlines()[0])

    for key, scorer in (("rougeL", Rouge()), ("cider", Cider())):
        s, s_img = scorer.compute_score(gts, res)
        corpus[key] = float(s)
        for k, v in zip(ids, s_img):
            per_image[k][key] = float(v)

    return Scores(corpus={k: corpus[k] for k in METRIC_KEYS}, per_image=per_image, notes=notes,
                  tokenizer=used)
