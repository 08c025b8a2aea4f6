"""`armada keys`: CURVE key pairs and allow-lists for a cell split over hosts (placeholder: being built)."""

from __future__ import annotations

import argparse


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make CURVE key pairs (private keys 0600) and allow-lists for remote hosts")
    p.add_argument("folder")


def run_keys(args: argparse.Namespace) -> int:
    print("armada keys: not built yet")
    return 2
