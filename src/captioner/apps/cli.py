"""The `captioner` command: a thin layer over the library functions.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and a
`_run_<name>(args) -> int` that calls into the library. Heavy imports stay inside the
run functions so `captioner --help` is instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# --- prepare (data) -------------------------------------------------------------------

def _add_prepare(sub):
    p = sub.add_parser("prepare", help="read a dataset in any known layout into a prepared WORKDIR")
    p.add_argument("root", help="dataset folder (Flickr8k, Kaggle, Karpathy JSON) or a custom .csv/.jsonl file")
    p.add_argument("--out", required=True, metavar="WORKDIR", help="folder to write dataset.jsonl, vocab.json, "
                   "summary.json into")
    p.add_argument("--min-count", type=int, default=5, help="train words seen fewer times become <unk>")
    p.add_argument("--max-len", type=int, default=None, help="cut stored training tokens to this many words")
    p.add_argument("--seed", type=int, default=0, help="seed of the split drawn when the data has none")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from captioner.data.datasets import prepare
    try:
        s = prepare(args.root, args.out, min_count=args.min_count, max_len=args.max_len, seed=args.seed,
                    progress=not args.no_progress)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"layout {s['layout']}  root {s['root']}")
    print(f"{'split':<6} {'images':>7} {'present':>8} {'absent':>7} {'captions':>9}")
    for name, c in s["splits"].items():
        print(f"{name:<6} {c['images']:>7} {c['present']:>8} {c['absent']:>7} {c['captions']:>9}")
    L = s["caption_length"]
    print(f"vocabulary {s['vocab_size']} words (min count {s['min_count']}), unk rate train "
          f"{s['unk_rate_train']:.2%}, dev {s['unk_rate_dev']:.2%}")
    print(f"caption length p50 {L['p50']:g}  p90 {L['p90']:g}  p95 {L['p95']:g}  p99 {L['p99']:g}  max {L['max']}")
    problems = s["problems"]
    if problems["count"]:
        print(f"{problems['count']} problems (all counts in summary.json):")
        for line in problems["first"]:
            print(f"  {line}")
    print(f"wrote {args.out}/dataset.jsonl, vocab.json, summary.json")
    return 0


# --- features ----------------------------------------------------------------------------

def _add_features(sub):
    p = sub.add_parser("features", help="encode every present image once into a feature store")
    p.add_argument("workdir", help="a prepared WORKDIR (from `captioner prepare`)")
    p.add_argument("--images", help="look images up as DIR/<image_id> instead of the prepared paths")
    p.add_argument("--encoder", default="lite2",
                   help="lite0, lite1, lite2 (default), concatenations like lite0+lite2, lite2-cutK to fine-tune "
                        "its top K blocks in training, or lite2@320 for a larger input (a 10x10 grid)")
    p.add_argument("--flip", action="store_true", help="encode the mirror images (for flip_prob in training)")
    p.add_argument("--crops", type=int, default=0, metavar="N",
                   help="encode N randomly cropped, colour-jittered copies of every photo (for crop_views in training)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"], help="CNN runtime")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded together")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to encode on a GPU (torch backend)")
    p.add_argument("--int8", action="store_true",
                   help="the shipped static-int8 encoder graph: 2.6x faster, the grids `caption` and `evaluate` use")
    p.set_defaults(run=_run_features)


def _run_features(args) -> int:
    from captioner.features.store import FLIP, build_features, crop_views
    if args.crops < 0 or (args.flip and args.crops):
        raise UserError("--crops takes a number of copies >= 1, and not with --flip (one kind of store per run)")
    for view in [FLIP] if args.flip else crop_views(args.crops) or [""]:
        try:
            s = build_features(args.workdir, images_dir=args.images, encoder=args.encoder, backend=args.backend,
                               batch_size=args.batch_size, device=args.device, view=view, int8=args.int8)
        except (ValueError, RuntimeError) as e:  # bad workdir, unknown encoder, failed ONNX export
            raise UserError(str(e)) from None
        print(f"{s['store']}: {s['rows']} {s['weights']} grids stored; encoded {s['encoded']} in {s['seconds']:.1f} s "
              f"({s['images_per_s']:.1f} img/s), {s['skipped_done']} already done, {s['missing']} absent, "
              f"{len(s['failed'])} failed")
        for image_id, reason in s["failed"].items():
            print(f"  failed {image_id}: {reason}")
    return 0


# --- train -------------------------------------------------------------------------------

def _add_train(sub):
    p = sub.add_parser("train", help="train a Show-Attend-Tell model on a prepared WORKDIR")
    p.add_argument("workdir", help="prepared dataset folder with a feature store (captioner prepare/features)")
    p.add_argument("--out", required=True, help="run folder for checkpoints, logs and curves")
    p.add_argument("--config", help="TOML file with Config fields (see captioner/config.py)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per batch (each brings all its captions)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, dest="num_workers", help="DataLoader worker processes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one Config field after --config, e.g. --set decoder_dim=1024 --set encoder=lite0")
    p.add_argument("--init", help="checkpoint to start from; its config is the base that --config overrides")
    p.add_argument("--scst", action="store_true",
                   help="self-critical training on CIDEr-D (needs --init; see configs/flickr8k-scst.toml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--force", action="store_true",
                   help="start afresh in --out even though it holds a run's outputs (they are overwritten)")
    p.add_argument("--device", help="cpu or cuda (unset: cuda when available)")
    p.set_defaults(run=_run_train)


def _parse_override(text: str) -> tuple[str, object]:
    """"decoder_dim=1024" -> ("decoder_dim", 1024): the value is read as TOML, else taken as a string."""
    import tomllib
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


def _run_train(args) -> int:
    from captioner.checkpoint import load_checkpoint
    from captioner.config import Config
    from captioner.train import train
    try:
        base = load_checkpoint(args.init).config if args.init else Config()
    except ValueError as e:
        raise UserError(str(e))
    try:
        config = Config.from_toml(args.config, base) if args.config else base
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{args.config}: {e}")
    try:
        config = Config.from_dict({**dataclasses.asdict(config), **dict(_parse_override(o) for o in args.overrides)})
    except (ValueError, TypeError) as e:
        raise UserError(f"--set: {e}")
    config = config.replace(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            num_workers=args.num_workers, objective="scst" if args.scst else None)
    try:
        result = train(args.workdir, args.out, config, init=args.init, resume=args.resume, device=args.device,
                       force=args.force)
    except ValueError as e:
        raise UserError(str(e))
    print(f"best dev {config.select_metric}: {result['best']:.4f}; checkpoints in {result['rundir']}")
    return 0


# --- evaluate ----------------------------------------------------------------------------

def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="decode a split and score it the COCO-toolkit way")
    p.add_argument("--model", metavar="PATH", help="checkpoint file or model folder; default: the shipped model")
    p.add_argument("--data", help="prepared WORKDIR or raw dataset ROOT (references and images)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="split to score")
    p.add_argument("--beam", type=int, default=3, help="beam size (1 = greedy)")
    p.add_argument("--max-len", type=int, default=30, help="longest caption in words")
    p.add_argument("--batch-size", type=int, default=100, help="images decoded at once")
    p.add_argument("--out", required=True, help="folder for metrics.json, captions.json, report.html")
    p.add_argument("--captions", help="score this COCO results file [{image_id, caption}] instead of a model")
    p.add_argument("--references", help="references: COCO annotations JSON or JSONL of {image, caption}")
    p.add_argument("--max-images", type=int, dest="limit", metavar="N",
                   help="only the first N images of the split (quick checks)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves its ~10 s JVM start)")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="float encoder and decoder (then the float feature store of --data is used)")
    p.add_argument("--plain", dest="grounded", action="store_false",
                   help="score the decoder's own sentences: no concept/evidence heads, no hedging")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from captioner.evaluation.evaluate import evaluate, format_table
    if args.beam < 1 or args.max_len < 1 or args.batch_size < 1:
        raise UserError("--beam, --max-len and --batch-size must be at least 1")
    if args.data is None and args.references is None:
        raise UserError("evaluate needs --data WORKDIR|ROOT (or --captions with --references)")
    try:
        m = evaluate(args.model, args.data, args.split, beam_size=args.beam, out=args.out,
                     captions_file=args.captions, references_file=args.references, max_len=args.max_len,
                     batch_size=args.batch_size, limit=args.limit, meteor=not args.no_meteor, int8=args.int8,
                     grounded=args.grounded)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(f"{m['split']} split, {m['num_images']} images, model {m['model']}"
          + (f", beam {m['beam_size']}" if m.get("beam_size") else ""))
    print(format_table(m))
    for note in m["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}/metrics.json, captions.json, report.html")
    return 0


# --- caption -----------------------------------------------------------------------------

def _add_caption(sub):
    p = sub.add_parser("caption", help="caption image files, folders or globs",
                       description="Caption photos. Output: 'path<TAB>caption' per image (with --n-best N > 1: "
                       "'path<TAB>rank<TAB>score<TAB>caption' per hypothesis), or --json / --csv. A field "
                       "holding a tab, newline or double quote is double-quoted, CSV-style, so every line parses.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    _add_model_options(p)
    p.add_argument("--n-best", type=int, default=1, help="captions per image, best first; at most --beam")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="print a JSON list of {path, text, caption, confidence, concepts, score, alternatives}")
    fmt.add_argument("--csv", action="store_true",
                     help="print CSV: path,text,confidence,tags,caption,score (with --n-best: path,rank,...)")
    fmt.add_argument("--vtt", action="store_true", help="videos: print WebVTT, one cue per scene (one video)")
    fmt.add_argument("--srt", action="store_true", help="videos: print SubRip (SRT), one cue per scene (one video)")
    p.add_argument("--attention", metavar="DIR", help="write one PNG per image with per-word attention maps")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded and decoded together")
    p.add_argument("--fps", type=float, default=4.0, help="videos: frames sampled per second")
    p.add_argument("--scene-threshold", type=float, default=0.12,
                   help="videos: how different (0-1, on small grayscale thumbnails) a frame must be from the "
                        "scene's first to start a new scene")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("scale-out on Ray (pip install 'captioner[ray]'; apps/scale.py)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="caption on Ray: alone, a local instance on --ray-cpus cores; 'auto' or HOST:PORT, "
                          "a running cluster. PATHs may be URIs (s3://...). Needs --out")
    ray.add_argument("--out", metavar="FILE.jsonl", help="with --ray: one JSON line per photo, appended; "
                     "photos already in it are skipped, so a rerun resumes")
    ray.add_argument("--workers", type=int, default=2, metavar="N", help="with --ray: model replicas (actors)")
    ray.add_argument("--ray-cpus", type=int, default=2, metavar="N", help="with --ray alone: cores of the local instance")
    p.set_defaults(run=_run_caption)


def _add_model_options(p) -> None:
    """The options that choose and set up the model, spelled the same in every subcommand that captions."""
    p.add_argument("--model", metavar="PATH", default=None,
                   help="checkpoint file or model folder (`captioner export`); default: the shipped model")
    p.add_argument("--beam", type=int, default=3, help="beam size, 1 = greedy")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"], help="CNN runtime")
    p.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"],
                   help="decoder runtime: torch (int8), or a model folder's ONNX graphs (no torch needed); "
                        "auto: torch if installed")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="float encoder and decoder instead of int8 (slower; the same dev scores)")
    p.add_argument("--plain", dest="grounded", action="store_false",
                   help="ignore the model's concept and evidence heads: the decoder's sentence, never hedged")


def _expand_image_paths(specs: list[str]) -> tuple[list, list[str]]:
    """Files, folders (recursive) and globs -> (image paths in order, one-line usage problems).
    Globs are expanded here too, for shells (Windows cmd, quoted args) that leave them alone."""
    import glob
    from pathlib import Path

    from captioner.apps.library import find_images
    paths, problems, skipped = [], [], []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = find_images(p, skipped)
        elif p.is_file():
            found = [p]  # named explicitly: tried whatever its extension, so a bad one is reported
        elif glob.has_magic(spec):
            found = []
            for m in map(Path, sorted(glob.glob(str(p), recursive=True))):
                found += find_images(m, skipped) if m.is_dir() else [m] if m.is_file() else []
        elif p.exists():
            found = [p]  # a special file: load_image says what it is
        else:
            problems.append(f"{spec}: " + (os.strerror(errno.ELOOP) if _is_loop(p)
                                           else "no such file or folder"))
            continue
        if not found:
            problems.append(f"{spec}: " + ("no images found (jpg, png, gif, bmp, webp, tif, heic, avif)" if p.is_dir()
                                           else "no file matches this pattern"))
        paths += found
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return list(dict.fromkeys(paths)), problems  # dedupe, keep order


def _is_loop(p) -> bool:
    try:
        p.stat()
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _attention_png(result, path, folder, taken: set) -> None:
    """Per-word attention overlays for one captioned image, written atomically as FOLDER/<stem>.png."""
    import io
    from pathlib import Path

    from captioner.evaluation.report import plot_attention
    from captioner.data.images import load_image
    from captioner.io import atomic_write_bytes
    stem, k = Path(path).stem, 1
    while (name := f"{stem}.png" if k == 1 else f"{stem}-{k}.png") in taken:  # same name in two folders
        k += 1
    taken.add(name)
    buf = io.BytesIO()
    plot_attention(load_image(path), result.tokens, result.attention, buf)
    atomic_write_bytes(Path(folder) / name, buf.getvalue())


class _CaptionOutput:
    """Where `caption` writes each photo: tab-separated text (default), CSV, or one JSON list at the end."""

    def __init__(self, args):
        import csv
        self.json, self.n_best, self.rows = args.json, args.n_best, []
        self.csv = csv.writer(sys.stdout, lineterminator="\n") if args.csv else None
        # tab-separated text, quoted only where a field holds a tab, newline or quote (a file name may)
        self.tsv = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n")
        if self.csv:
            self.csv.writerow(["path", "rank", "caption", "score"] if self.n_best > 1 else
                              ["path", "text", "confidence", "tags", "caption", "score"])

    def write(self, path, r) -> None:
        alts = r.alternatives[:self.n_best]
        if self.json:
            self.rows.append({"path": str(path)} | r.to_dict() | {"alternatives": alts})
        elif self.csv and self.n_best > 1:
            self.csv.writerows([path, k, a["caption"], a["score"]] for k, a in enumerate(alts, 1))
        elif self.csv:
            self.csv.writerow([path, r.text, "" if r.confidence is None else r.confidence,
                               " ".join(c["word"].replace(" ", "_") for c in r.concepts), r.caption, r.score])
        elif self.n_best > 1:
            self.tsv.writerows([path, k, f"{a['score']:.4f}", a["caption"]] for k, a in enumerate(alts, 1))
        else:
            self.tsv.writerow([path, r.text])

    def close(self) -> None:
        if self.json:
            import json
            print(json.dumps(self.rows, indent=2, ensure_ascii=False))


def _run_caption(args, captioner=None) -> int:
    """`captioner` may be passed in preloaded (benchmarks/latency.py times this exact path)."""
    from tqdm import tqdm

    from captioner.apps.readahead import caption_paths
    from captioner.apps.video import is_video
    if args.beam < 1 or args.batch_size < 1 or not 1 <= args.n_best <= args.beam:
        raise UserError("--beam and --batch-size must be at least 1, and --n-best between 1 and --beam")
    videos = [p for p in args.paths if is_video(p)]
    if videos or args.vtt or args.srt:
        if len(videos) != len(args.paths):
            raise UserError("give either videos or images, not both" if videos else
                            "--vtt and --srt are for videos (.mp4, .mkv, .webm, .mov, ...)")
        return _run_caption_videos(args, videos, captioner)
    if args.ray or args.out:
        return _run_caption_ray(args)
    paths, problems = _expand_image_paths(args.paths)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not paths:
        raise UserError("no images to caption")
    captioner = captioner or _load_for(args)

    out, failed, taken = _CaptionOutput(args), 0, set()
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=args.no_progress or len(paths) <= 20)
    # threads read the next batches while this one is captioned (+13% images/s; benchmarks/readahead.py)
    for batch, results in caption_paths(captioner, paths, args.batch_size, beam_size=args.beam, n_best=args.n_best,
                                        attention=bool(args.attention)):
        for path, r in zip(batch, results):
            if isinstance(r, Exception):  # ImageError: its message is already "PATH: reason"
                failed += 1
                tqdm.write(f"error: {r}", file=sys.stderr)
                continue
            out.write(path, r)
            if args.attention:
                try:
                    _attention_png(r, path, args.attention, taken)
                except (OSError, ValueError) as e:
                    failed += 1
                    tqdm.write(f"error: {path}: attention map not written ({' '.join(str(e).split())})",
                               file=sys.stderr)
        sys.stdout.flush()  # text and CSV stream batch by batch, so long runs show results early
        bar.update(len(batch))
    bar.close()
    out.close()
    if failed and len(paths) > 1:
        print(f"{len(paths) - failed} of {len(paths)} images captioned, {failed} failed", file=sys.stderr)
    return 2 if problems else 1 if failed else 0


def _run_caption_ray(args) -> int:
    from captioner.apps import scale
    if not (args.ray and args.out) or args.json or args.csv or args.attention or args.n_best > 1:
        raise UserError("--ray and --out go together, without --json, --csv, --attention or --n-best")
    if args.workers < 1 or args.ray_cpus < 1:
        raise UserError("--workers and --ray-cpus must be at least 1")
    uris = [s for s in args.paths if scale.is_uri(s)]
    local = [s for s in args.paths if not scale.is_uri(s)]
    paths, problems = _expand_image_paths(local) if local else ([], [])
    for uri in uris:
        try:
            paths += scale.list_uri_images(uri)
        except (OSError, ValueError) as e:  # unknown scheme, missing bucket, no credentials
            problems.append(f"{uri}: {' '.join(str(e).split())}")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not paths:
        raise UserError("no images to caption")
    try:
        stats = scale.caption_to_jsonl(paths, args.out, address=None if args.ray == "local" else args.ray,
                                       workers=args.workers, batch_size=args.batch_size, model=args.model,
                                       beam=args.beam, int8=args.int8, grounded=args.grounded,
                                       backend=args.backend, num_cpus=args.ray_cpus, progress=not args.no_progress)
    except (RuntimeError, ValueError, OSError) as e:  # Ray missing, an output file that is not ours
        raise UserError(str(e).splitlines()[0]) from None
    print(f"{args.out}: {stats['written']} written, {stats['skipped']} already there, {stats['failed']} failed",
          file=sys.stderr)
    return 2 if problems else 1 if stats["failed"] else 0


def _load_for(args):
    from captioner.apps.api import Captioner
    try:
        return Captioner.load(args.model, runtime=args.runtime, backend=args.backend, beam_size=args.beam, int8=args.int8,
                              grounded=args.grounded)
    except (ValueError, RuntimeError, OSError) as e:  # missing/bad checkpoint, failed ONNX export
        raise UserError(str(e).splitlines()[0]) from None


def _run_caption_videos(args, videos: list[str], captioner=None) -> int:
    """One description per scene: `path<TAB>start<TAB>end<TAB>text` lines, or --vtt / --srt / --json. A damaged
    video: its cues before the damage are printed, then one error line; exit status 1."""
    import json

    from captioner.apps.video import VideoError, describe_video, to_json, to_srt, to_vtt
    if (args.vtt or args.srt) and len(videos) > 1:
        raise UserError("--vtt and --srt write one video at a time (or use --json)")
    if args.fps <= 0 or not 0 < args.scene_threshold < 1:
        raise UserError("--fps must be positive and --scene-threshold between 0 and 1")
    captioner = captioner or _load_for(args)
    failed, docs = 0, []
    for path in videos:
        error = None
        try:
            cues = describe_video(captioner, path, fps=args.fps, threshold=args.scene_threshold,
                                  batch_size=args.batch_size, progress=not args.no_progress)
        except VideoError as e:
            cues, error = e.cues, str(e)
            failed += 1
        if args.vtt or args.srt:
            sys.stdout.write((to_vtt if args.vtt else to_srt)(cues))
        elif args.json:
            docs.append(json.loads(to_json(cues, path, error)))
        else:
            for c in cues:
                print(f"{path}\t{c.start:.3f}\t{c.end:.3f}\t{c.text}")
        sys.stdout.flush()
        if error:
            print(f"error: {error}" + (f"; kept the {len(cues)} scenes before it" if cues else ""),
                  file=sys.stderr)
    if args.json:
        print(json.dumps(docs, indent=2, ensure_ascii=False))
    return 1 if failed else 0


# --- live --------------------------------------------------------------------------------

def _add_live(sub):
    p = sub.add_parser("live", help="describe a camera, stream or video as it plays: one line per scene change",
                       description="Reads SOURCE with PyAV (a camera such as /dev/video0, a stream URL such as "
                       "rtsp://..., or a video file) and prints 'time<TAB>text<TAB>tags' each time the scene "
                       "changes, or one JSON object per line with --json.")
    p.add_argument("source", help="camera device, stream URL or video file")
    p.add_argument("--format", dest="fmt", default=None,
                   help="demuxer PyAV should use (v4l2 for /dev/video*, which is the default there)")
    p.add_argument("--json", action="store_true", help="JSON lines: {start, text, caption, confidence, tags}")
    _add_model_options(p)
    p.add_argument("--fps", type=float, default=4.0, help="frames looked at per second")
    p.add_argument("--scene-threshold", type=float, default=0.12, help="see `captioner caption --help`")
    p.set_defaults(run=_run_live)


def _run_live(args) -> int:
    import json

    from captioner.apps.video import VideoError, describe_live
    if args.fps <= 0 or not 0 < args.scene_threshold < 1 or args.beam < 1:
        raise UserError("--fps and --beam must be positive and --scene-threshold between 0 and 1")
    captioner = _load_for(args)
    try:
        for cue in describe_live(captioner, args.source, fps=args.fps, threshold=args.scene_threshold,
                                 fmt=args.fmt):
            d = cue.to_dict()
            d.pop("end")  # unknown while it plays
            print(json.dumps(d, ensure_ascii=False) if args.json
                  else f"{cue.start:9.2f}\t{cue.text}\t{', '.join(cue.tags)}", flush=True)
    except VideoError as e:
        raise UserError(str(e)) from None
    return 0


# --- serve -------------------------------------------------------------------------------

def _add_serve(sub):
    p = sub.add_parser("serve", help="HTTP API and accessible web page")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback lets other machines in")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="checkpoint file or model folder; default: the shipped model")
    p.add_argument("--max-upload-mb", type=float, default=10, help="larger uploads get 413")
    p.add_argument("--db", metavar="LIBRARY", default=None, help="SQLite photo library to search")
    p.add_argument("--batch-size", type=int, default=16, dest="max_batch", metavar="N",
                   help="most requests captioned together (micro-batching); 1 turns batching off")
    p.add_argument("--max-batch", type=int, dest="max_batch", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # its old name
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name clients use to reach the server (repeatable; '*' allows any). "
                        "Loopback names, IP addresses and --host are always allowed; other names are refused "
                        "so that web pages cannot reach the server through DNS rebinding")
    p.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                   help="a web site (origin, e.g. https://example.com) whose pages may call the API (repeatable; "
                        "'*' allows any); without it other sites' pages cannot POST to the server")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from captioner.apps.server import serve
    try:
        serve(args.host, args.port, model=args.model, max_upload_mb=args.max_upload_mb, db=args.db,
              max_batch=args.max_batch, allow_hosts=args.allow_host, cors_origins=args.cors_origin)
    except (OSError, ValueError) as e:
        raise UserError(f"serve: {e}") from None
    return 0


# --- export ------------------------------------------------------------------------------------

def _add_export(sub):
    p = sub.add_parser("export", help="write a model folder: config, vocabulary, weights, ONNX graphs, model card",
                       description="Write a model folder (pretrained.py) that `--model DIR`, Captioner.load(DIR) and "
                       "installs without torch run. Every ONNX graph is checked against the torch model.")
    p.add_argument("folder", metavar="DIR", help="the folder to write (replaced if it is a model folder)")
    p.add_argument("--model", metavar="CKPT", default=None, help="checkpoint to export (default: the shipped model)")
    p.add_argument("--card", metavar="FILE.md", help="model card (default: written from the checkpoint's metadata)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from captioner.pretrained import save_pretrained
    try:
        card = open(args.card, encoding="utf-8").read() if args.card else None
        info = save_pretrained(args.model, args.folder, card=card)
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(str(e).splitlines()[0]) from None
    worst = max(info["onnx_check"]["max_abs_error"].values())
    print(f"{args.folder}: model folder of {info['name']} written (ONNX graphs within {worst:.1e} of torch)")
    return 0


# --- library: index / search / tags / alt-text ----------------------------------------------

def _add_library(sub):
    p = sub.add_parser("index", help="caption every image and video scene under a folder into an SQLite library")
    p.add_argument("folder", help="folder searched recursively for jpg/jpeg/png/gif/bmp/webp/tif/tiff/heic/heif/avif "
                   "images and mp4/mov/mkv/webm/avi/... videos (one library entry per scene)")
    p.add_argument("--db", default="library.sqlite", help="SQLite library to create or update")
    _add_model_options(p)
    p.add_argument("--n-best", type=int, default=3, help="captions kept and searched per image")
    p.add_argument("--batch-size", type=int, default=16, help="images captioned and committed together")
    p.add_argument("--recaption", action="store_true",
                   help="caption every image again, changed or not (e.g. after upgrading the model)")
    p.add_argument("--write-metadata", action="store_true",
                   help="also write each photo's description and tags to an XMP sidecar, PHOTO.xmp (e.g. "
                        "photo.jpg.xmp), which digiKam, darktable and Lightroom read; the photo is not touched")
    p.add_argument("--in-file", action="store_true",
                   help="with --write-metadata: write into the image file's own XMP instead (needs exiftool; "
                        "metadata only, the pixels are not re-encoded)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("scale-out on Ray (pip install 'captioner[ray]'; apps/scale.py)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="caption the photos on Ray: alone, a local instance on --ray-cpus cores; 'auto' or "
                          "HOST:PORT, a running cluster (FOLDER at the same path on every node). This process "
                          "writes the library and describes the videos")
    ray.add_argument("--workers", type=int, default=2, metavar="N", help="with --ray: model replicas (actors)")
    ray.add_argument("--ray-cpus", type=int, default=2, metavar="N",
                     help="with --ray alone: cores of the local instance")
    p.set_defaults(run=_run_index)
    p = sub.add_parser("tag", help="caption photos and write their description and tags as XMP metadata",
                       description="Writes each photo's description (dc:description) and tags (dc:subject) to an "
                       "XMP sidecar PHOTO.xmp next to it, marked as generated by captioner; an existing sidecar "
                       "is merged (a person's description and keywords stay). The photo itself is never opened "
                       "for writing unless --in-file is given.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or globs")
    _add_model_options(p)
    p.add_argument("--in-file", action="store_true",
                   help="write into the image file's own XMP instead of a sidecar (needs exiftool)")
    p.add_argument("--batch-size", type=int, default=16, help="images captioned together")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_tag)
    p = sub.add_parser("search", help="search a library by words")
    p.add_argument("query", help="free text; every word is plain text (no FTS5 syntax)")
    p.add_argument("--db", default="library.sqlite", help="SQLite library")
    p.add_argument("--limit", type=int, default=10, help="results shown")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, score, caption, ...}; video scenes add start and end seconds")
    p.set_defaults(run=_run_search)
    p = sub.add_parser("tags", help="list a library's tags with counts")
    p.add_argument("--db", default="library.sqlite", help="SQLite library")
    p.add_argument("--limit", type=int, default=None, help="show only the most common N tags")
    p.add_argument("--json", action="store_true", help="print a JSON list of [tag, count]")
    p.set_defaults(run=_run_tags)
    p = sub.add_parser("alt-text", help="fill missing alt text of <img> tags in an HTML page")
    p.add_argument("page", help="HTML file; images are resolved relative to it")
    p.add_argument("-o", "--out", default=None, help="write the page here (may be PAGE itself, written "
                   "atomically); default: print the page to stdout")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="read images only under DIR (default: the page's folder)")
    _add_model_options(p)
    p.add_argument("--min-confidence", type=float, default=0.0, metavar="X",
                   help="leave an image without generated alt text when its description's confidence "
                        "(0-1) is below X, and report it")
    p.set_defaults(run=_run_alt_text)


def _load_if_chosen(args):
    """The captioner the model options ask for, or None for the shipped model with default settings, which
    the library loads only if some image needs captioning."""
    chosen = args.model or args.backend != "auto" or args.runtime != "auto" or not args.int8 or not args.grounded
    return _load_for(args) if chosen else None


def _run_index(args) -> int:
    from captioner.apps.library import index_folder
    from captioner.apps.metadata import exiftool_path, write_library_metadata
    if args.in_file and not args.write_metadata:
        raise UserError("--in-file goes with --write-metadata")
    if args.in_file and exiftool_path() is None:  # before captioning a whole folder
        raise UserError("--in-file needs exiftool (apt install libimage-exiftool-perl); without it, sidecars")
    ray = _ray_index_options(args)
    try:
        # with --ray the workers caption the photos; this process loads a model only if a video needs one
        captioner = (lambda: _load_for(args)) if ray else _load_if_chosen(args)
        s = index_folder(args.folder, args.db, captioner, beam_size=args.beam, n_best=args.n_best,
                         batch_size=args.batch_size, progress=not args.no_progress, recaption=args.recaption, ray=ray)
        meta = write_library_metadata(args.db, args.folder, in_file=args.in_file) if args.write_metadata else None
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: --ray without Ray installed
        raise UserError(str(e).splitlines()[0]) from None
    for line in s.get("skipped", []) + s["errors"] + (meta["errors"] if meta else []):
        print(f"skipped {line}", file=sys.stderr)
    videos = f" and {s['videos']} videos" if s["videos"] else ""
    described = f"{s['described']} videos described ({s['scenes']} scenes), " if s["videos"] else ""
    print(f"{s['db']}: {s['found']} images{videos} under {s['folder']}: {s['captioned']} captioned, {described}"
          f"{s['unchanged'] + s['touched']} unchanged, {s['removed']} removed, {s['failed']} unreadable"
          + (f" (model {s['model']})" if s["model"] else "")
          + (f"; metadata written for {len(meta['written'])}" + (" (in the files)" if args.in_file else " (XMP sidecars)")
             if meta else ""))
    return 1 if meta and meta["errors"] else 0


def _ray_index_options(args) -> dict | None:
    """index_folder's `ray` options from `index --ray`: where Ray runs and how the workers load the model."""
    if not args.ray:
        return None
    from pathlib import Path

    from captioner.apps.scale import require_ray
    if args.workers < 1 or args.ray_cpus < 1:
        raise UserError("--workers and --ray-cpus must be at least 1")
    try:
        require_ray()  # before a folder is read
    except RuntimeError as e:
        raise UserError(str(e)) from None
    # checked here: a worker that cannot load it fails with a Ray traceback; absolute, as workers' cwd may differ
    model = Path(args.model).absolute() if args.model else None
    if model and not model.exists():
        raise UserError(f"{args.model}: no such model file or folder")
    return {"address": None if args.ray == "local" else args.ray, "workers": args.workers,
            "num_cpus": args.ray_cpus, "model": str(model) if model else None, "int8": args.int8,
            "grounded": args.grounded, "backend": args.backend, "runtime": args.runtime}


def _run_tag(args) -> int:
    from captioner.apps.metadata import tag_files
    if args.beam < 1 or args.batch_size < 1:
        raise UserError("--beam and --batch-size must be at least 1")
    paths, problems = _expand_image_paths(args.paths)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not paths:
        raise UserError("no images to tag")
    try:
        report = tag_files(paths, _load_if_chosen(args), in_file=args.in_file, beam_size=args.beam,
                           batch_size=args.batch_size, progress=not args.no_progress)
    except ValueError as e:  # no exiftool for --in-file, a bad model
        raise UserError(str(e)) from None
    for line in report["errors"]:
        print(f"error: {line}", file=sys.stderr)
    where = "into the files" if args.in_file else "as XMP sidecars"
    print(f"{len(report['written'])} of {len(paths)} photos tagged {where}", file=sys.stderr)
    return 2 if problems else 1 if report["errors"] else 0


def _run_search(args) -> int:
    import json
    from captioner.apps.library import search
    from captioner.apps.video import clock
    try:
        hits = search(args.db, args.query, limit=args.limit)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    if not hits:
        print("no matches", file=sys.stderr)
    for i, h in enumerate(hits, 1):
        also = f"  (matched: {h['matched']})" if h["matched"] != h["caption"] else ""
        path = json.dumps(h["path"], ensure_ascii=False) if any(c in h["path"] for c in '"\n\r\t') else h["path"]
        when = f" {clock(h['start'])}-{clock(h['end'])}" if "start" in h else ""  # a video scene
        print(f"{i:>3}. {h['score']:9.3g}  {path}{when}\n       {h['caption']}{also}")
    return 0


def _run_tags(args) -> int:
    import json
    from captioner.apps.library import tags
    try:
        counts = tags(args.db)[:args.limit]
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(counts))
    else:
        for tag, n in counts:
            print(f"{n:>6}  {tag}")
    return 0


def _run_alt_text(args) -> int:
    from captioner.apps.alttext import fill_alt_text
    try:
        captioner = _load_if_chosen(args)
        report = fill_alt_text(args.page, args.out, captioner, beam_size=args.beam, root=args.root,
                               min_confidence=args.min_confidence)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    for line in report.skipped + report.errors + report.unsure:
        print(f"skipped {line}", file=sys.stderr)
    if args.out is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(report.data)
        sys.stdout.buffer.flush()
    print(f"{args.page}: {len(report.filled)} alt texts filled, {report.kept} kept, {report.decorative} decorative, "
          f"{len(report.skipped)} not local, {len(report.errors)} unreadable"
          + (f", {len(report.unsure)} below --min-confidence" if args.min_confidence > 0 else "")
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show (unset options, on/off flags)."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or isinstance(d, bool) or d == [] or d is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from functools import partial

    from captioner import __version__
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.splitlines()[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=partial(argparse.ArgumentParser, formatter_class=_HelpFormatter))
    for add in (_add_prepare, _add_features, _add_train, _add_evaluate, _add_caption, _add_live,
                _add_serve, _add_library, _add_export):
        add(sub)
    return parser


# optional modules -> the extra that installs them (pyproject.toml), for the base install's one-line error
EXTRAS = {"torch": "train", "safetensors": "train", "onnx": "train", "onnxscript": "train",
          "efficientnet_lite_pytorch": "train", "matplotlib": "train", "fastapi": "serve", "uvicorn": "serve",
          "starlette": "serve", "multipart": "serve", "swagger_ui_bundle": "serve", "pycocoevalcap": "eval",
          "av": "video", "ray": "ray"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(f"error: `captioner {args.command}` needs {top}, which this install lacks: "
              f"pip install 'captioner[{EXTRAS[top]}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`captioner caption ... | head`): stop quietly, as other Unix tools do; stdout
        # is pointed at /dev/null so the interpreter's final flush does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe


if __name__ == "__main__":
    sys.exit(main())
