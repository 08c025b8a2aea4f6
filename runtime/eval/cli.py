"""`armada eval CELL --episodes N`: the closed-loop proof in simulation (runtime/eval/pipeline.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="record expert demos, train, merge and evaluate a merged policy in simulation")
    ev.add_argument("cell", type=Path, help="a simulated cell (backend kind mujoco)")
    ev.add_argument("--episodes", type=int, default=20, help="evaluation episodes per task and condition")
    ev.add_argument("--work", type=Path, default=None, help="folder for demos, checkpoints, bundles and results "
                    "(default: ./eval-<cell name>); finished stages are reused")
    ev.add_argument("--demos", type=int, default=30, help="expert demonstrations per task")
    ev.add_argument("--base-steps", type=int, default=2000, help="training steps of the shared base")
    ev.add_argument("--task-steps", type=int, default=1000, help="training steps of each single-task fine-tune")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--redo", choices=["demos", "train", "merge", "eval"], default=None,
                    help="redo this stage and everything after it")
    ev.add_argument("--json", type=Path, default=None, help="also write the results here")


def run_eval(args: argparse.Namespace) -> int:
    raise SystemExit("armada eval: not built yet")
