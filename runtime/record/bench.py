"""`armada bench record`: placeholder until the recorder lands (issue 11)."""

from __future__ import annotations

import argparse


def run_record_bench(args: argparse.Namespace) -> int:
    """Uses args.seconds, args.quick, args.json; prints a table; returns the exit code."""
    raise SystemExit("armada bench record: not built yet")
