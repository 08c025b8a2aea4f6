"""`armada bench fleet` (issue 16): being built."""

from __future__ import annotations

import argparse
import sys


def run_fleet_bench(args: argparse.Namespace) -> int:
    print("armada bench fleet: not built yet (issue 16)", file=sys.stderr)
    return 2
