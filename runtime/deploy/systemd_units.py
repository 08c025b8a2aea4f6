"""`armada systemd CELL`: the units and drop-ins of one cell (placeholder: being built)."""

from __future__ import annotations

import argparse


def add_systemd_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("systemd", help="write the systemd units of a cell and say how to enable them")
    p.add_argument("cell")


def run_systemd(args: argparse.Namespace) -> int:
    print("armada systemd: not built yet")
    return 2
