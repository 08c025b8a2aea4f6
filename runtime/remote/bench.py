"""`armada bench remote` (placeholder: being built)."""

from __future__ import annotations

import argparse


def run_remote_bench(args: argparse.Namespace) -> int:
    print("armada bench remote: not built yet")
    return 2
