"""The ``dfrn`` command. It only parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from dfrn import __version__
from dfrn.errors import DfrnError

__all__ = ["main", "build_parser"]


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"dfrn: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfrn",
        description="Deep Factor Regression Network: symptom factors from structural MRI.",
    )
    parser.add_argument("--version", action="version", version=f"dfrn {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", parents=[common], help="run the pipeline configured in a study TOML file"
    )
    p.add_argument("config", type=Path, help="study TOML (see README)")
    p.add_argument("--out", type=Path, required=True, help="results folder (new, or a resume)")

    p = sub.add_parser(
        "demo", parents=[common], help="run the pipeline on a synthetic cohort with planted effects"
    )
    p.add_argument("--out", type=Path, default=Path("dfrn-demo"), help="results folder")
    p.add_argument("--full", action="store_true", help="the paper's protocol at 1 mm (GPU)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "run":
        from dfrn.config import load_config
        from dfrn.pipeline import run_study

        run_study(load_config(args.config), args.out, progress=progress)
    elif args.command == "demo":
        from dfrn.demo import run_demo

        run_demo(args.out, full=args.full, seed=args.seed, progress=progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _warning_line
    try:
        return _run(args)
    except DfrnError as exc:
        print(f"dfrn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfrn: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
