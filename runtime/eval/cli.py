"""`armada eval CELL --episodes N`: the closed-loop proof in simulation (runtime/eval/pipeline.py)."""

from __future__ import annotations

import argparse
import sys
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
    ev.add_argument("--duration", type=float, default=None,
                    help="seconds an episode may last (default: the cell's inference.episode_duration_s)")
    ev.add_argument("--batch", type=int, default=32, help="training batch size")
    ev.add_argument("--size", default="sim-tiny", help="architecture size for training (see `armada model train`)")
    ev.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate of the base and of each fine-tune (1e-3 reached a given loss in about "
                         "half the steps of 3e-4 on the sim demos)")
    ev.add_argument("--actions", choices=["relative", "absolute"], default="relative",
                    help="arm-joint targets relative to the observed state (default) or absolute")
    ev.add_argument("--run-dir", type=Path, default=None,
                    help="private folder for the cell's sockets and logs (default: $XDG_RUNTIME_DIR/armada-UID/"
                         "<cell>-eval, or /tmp/armada-UID/<cell>-eval)")


def run_eval(args: argparse.Namespace) -> int:
    import json

    from armada.runtime.eval.episodes import EvalError
    from armada.runtime.eval.pipeline import Options, print_results, run_pipeline

    opts = Options(cell=args.cell, work=args.work, demos=args.demos, episodes=args.episodes,
                   base_steps=args.base_steps, task_steps=args.task_steps, seed=args.seed, redo=args.redo,
                   duration_s=args.duration, batch=args.batch, size=args.size, lr=args.lr,
                   actions=args.actions, run_dir=args.run_dir)
    try:
        results = run_pipeline(opts)
    except (EvalError, ValueError, RuntimeError) as exc:
        print(f"armada eval: {exc}", file=sys.stderr)
        return 1
    print_results(results, Path(results["plan"]["work"]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
