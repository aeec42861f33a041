"""The ``kipik`` command: ``kipik gc`` removes what crashed or expired sessions left behind."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pytest_kipik import reaper
from pytest_kipik.config import resolve
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts import make_backend


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kipik", description="pytest-kipik's nested clusters outside of pytest"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gc = commands.add_parser(
        "gc",
        help="remove kipik resources that are expired or whose owner is gone",
        description="Remove the containers and volumes (or pods) pytest-kipik made that are "
        "past their expiry (kipik.io/expires-at, or the lease of kept, reused and warm hosts) "
        "or whose owner is gone (a dead pid on this machine, a deleted owner pod). Resources "
        "of live sessions and anything without kipik.io/ labels are never touched. The "
        "backend and its settings come from the KIPIK_* environment variables.",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    gc.add_argument(
        "--backend",
        choices=("auto", "docker", "pod"),
        help="where to look (default: KIPIK_BACKEND, else auto)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kipik``; returns the exit status (1 when a removal failed, 2 on a usage error)."""
    args = _parser().parse_args(argv)
    cli = {"backend": args.backend} if args.backend else {}
    try:
        config = resolve(cli, {}, os.environ, cwd=Path.cwd(), ini_dir=Path.cwd())
        backend = make_backend(config, lambda line: print(line, file=sys.stderr))
        try:
            problems = reaper.reap(
                backend, lambda line: print(line, flush=True), dry_run=args.dry_run
            )
        finally:
            backend.close()
    except KipikError as exc:
        print(f"kipik gc: {exc}", file=sys.stderr)
        return 2
    return 1 if problems else 0
