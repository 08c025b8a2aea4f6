"""`armada teleop CELL`: placeholder until the teleop session lands (issue 11)."""

from __future__ import annotations

import argparse


def add_teleop_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teleop", help="teleoperate a follower from its leader arm or the keyboard")
    p.add_argument("cell", type=str, help="cell YAML")


def run_teleop(args: argparse.Namespace) -> int:
    raise SystemExit("armada teleop: not built yet")
