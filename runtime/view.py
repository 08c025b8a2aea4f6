"""`armada view CELL` and `--view`: placeholder until the live view lands (issue 11)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_view_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="a live rerun view of a running cell")
    p.add_argument("cell", type=str, help="cell YAML")


def run_view(args: argparse.Namespace) -> int:
    raise SystemExit("armada view: not built yet")


class ViewHandle:
    def close(self) -> None:
        pass


def start_view(cell_path: Path, run_dir: Path, mode: str) -> ViewHandle:
    raise SystemExit("--view: not built yet")
