"""`armada doctor [CELL]`: can this cell run here? (placeholder: being built)."""

from __future__ import annotations

import argparse


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that a cell can run on this machine, with a fix for each problem")
    p.add_argument("cell", nargs="?")


def run_doctor(args: argparse.Namespace) -> int:
    print("armada doctor: not built yet")
    return 2
