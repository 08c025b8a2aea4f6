"""`armada model train`: fine-tune the MergeVLA-structured model on a LeRobotDataset (runtime/model/train.py)."""

from __future__ import annotations

import argparse
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


def run_train(args: argparse.Namespace) -> int:
    raise SystemExit("armada model train: not built yet")
