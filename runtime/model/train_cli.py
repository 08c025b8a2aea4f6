"""`armada model train`: fine-tune the MergeVLA-structured model on a LeRobotDataset (runtime/model/train.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_train_parser(msub) -> None:
    train = msub.add_parser("train", help="fine-tune a MergeVLA-structured model on a LeRobotDataset")
    train.add_argument("dataset", type=Path, help="the LeRobotDataset root (read offline)")
    train.add_argument("out", type=Path, help="the checkpoint directory to write (armada task-checkpoint layout)")
    train.add_argument("--repo-id", default=None, help="the dataset's repo id (default: local/<dataset name>)")
    train.add_argument("--task", default=None,
                       help="train on this task's episodes only (a single-task fine-tune); default: all tasks "
                            "(the shared base)")
    train.add_argument("--init", type=Path, default=None, help="start from this checkpoint (default: random init)")
    train.add_argument("--size", default="sim-tiny", help="architecture size: sim-tiny, tiny, or a JSON file")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--chunk", type=int, default=None, help="actions per chunk (default: the size's)")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--name", default=None,
                       help="the checkpoint's task name (the bundle's task name after a merge; default: the task "
                            "string with '_' for spaces, 'base' without --task)")
    train.add_argument("--parts", choices=("all", "expert"), default="all",
                       help="what a fine-tune trains: all weights (default, the MergeVLA recipe), or only the "
                            "parts a merge keeps per task (needs --init; merged = each fine-tune exactly, but the "
                            "router cannot tell such tasks apart)")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop when this much training time has passed, even before --steps")
    train.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default 1: two threads collapse to a crawl whenever another "
                            "process uses a core; 2 is faster only on an otherwise idle machine)")
    train.add_argument("--actions", choices=("relative", "absolute"), default="relative",
                       help="relative (default): arm joints trained as offsets from the state at the chunk's start "
                            "(the bundle says so; the policy adds the state back), grippers absolute; absolute: "
                            "every dimension an absolute target. A fine-tune must match its --init")
    train.add_argument("--cameras", default=None,
                       help="comma-separated cameras in the model's image order (default: every camera of the "
                            "dataset, in its order)")


def run_train(args: argparse.Namespace) -> int:
    from armada.runtime.model.train import DEFAULT_THREADS, TrainError, train

    try:
        train(args.dataset, args.out, repo_id=args.repo_id, task=args.task, init=args.init, size=args.size,
              steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, chunk=args.chunk,
              overwrite=args.overwrite, name=args.name, parts=args.parts,
              max_seconds=args.max_minutes * 60 if args.max_minutes else None,
              cameras=[c.strip() for c in args.cameras.split(",") if c.strip()] if args.cameras else None,
              threads=args.threads or DEFAULT_THREADS, actions=args.actions,
              progress=lambda line: print(line, flush=True))
    except TrainError as exc:
        print(f"armada model train: {exc}", file=sys.stderr)
        return 2
    return 0
