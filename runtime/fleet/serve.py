"""`armada serve BUNDLE` (issue 16): being built."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a merged bundle as a Ray Serve deployment (a fleet's model service)")
    serve.add_argument("bundle", type=Path)


def run_serve(args: argparse.Namespace) -> int:
    print("armada serve: not built yet (issue 16)", file=sys.stderr)
    return 2
