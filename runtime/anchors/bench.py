"""`armada bench anchors` (issue 15): being built."""

from __future__ import annotations

import argparse
import sys


def run_anchors_bench(args: argparse.Namespace) -> int:
    print("armada bench anchors: not built yet (issue 15)", file=sys.stderr)
    return 2
