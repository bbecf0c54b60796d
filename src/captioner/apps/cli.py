"""The `captioner` command: a thin layer over the library functions.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and a
`_run_<name>(args) -> int` that calls into the library. Heavy imports stay inside the
run functions so `captioner --help` is instant.
"""
from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# --- prepare (data) -------------------------------------------------------------------

def _add_prepare(sub):
    p = sub.add_parser("prepare", help="read a dataset in any known layout into a prepared WORKDIR")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    raise UserError("prepare: not implemented yet")


# --- features ----------------------------------------------------------------------------

def _add_features(sub):
    p = sub.add_parser("features", help="encode every present image once into a feature store")
    p.set_defaults(run=_run_features)


def _run_features(args) -> int:
    raise UserError("features: not implemented yet")


# --- train -------------------------------------------------------------------------------

def _add_train(sub):
    p = sub.add_parser("train", help="train a Show-Attend-Tell model on a prepared WORKDIR")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    raise UserError("train: not implemented yet")


# --- evaluate ----------------------------------------------------------------------------

def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="decode a split and score it the COCO-toolkit way")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    raise UserError("evaluate: not implemented yet")


# --- caption -----------------------------------------------------------------------------

def _add_caption(sub):
    p = sub.add_parser("caption", help="caption image files, folders or globs")
    p.set_defaults(run=_run_caption)


def _run_caption(args) -> int:
    raise UserError("caption: not implemented yet")


# --- serve -------------------------------------------------------------------------------

def _add_serve(sub):
    p = sub.add_parser("serve", help="HTTP API and accessible web page")
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    raise UserError("serve: not implemented yet")


# --- library: index / search / tags / alt-text ----------------------------------------------

def _add_library(sub):
    p = sub.add_parser("index", help="caption every image under a folder into an SQLite library")
    p.set_defaults(run=_run_not_ready)
    p = sub.add_parser("search", help="search a library by words")
    p.set_defaults(run=_run_not_ready)
    p = sub.add_parser("tags", help="list a library's tags with counts")
    p.set_defaults(run=_run_not_ready)
    p = sub.add_parser("alt-text", help="fill missing alt text of <img> tags in an HTML page")
    p.set_defaults(run=_run_not_ready)


def _run_not_ready(args) -> int:
    raise UserError(f"{args.command}: not implemented yet")


# -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prepare, _add_features, _add_train, _add_evaluate, _add_caption,
                _add_serve, _add_library):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
