"""`armada record CELL ...`: placeholder until the recorder lands (issue 11)."""

from __future__ import annotations

import argparse


def add_record_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record demonstrations to a LeRobotDataset v3")
    p.add_argument("cell", type=str, help="cell YAML")


def run_record(args: argparse.Namespace) -> int:
    raise SystemExit("armada record: not built yet")
