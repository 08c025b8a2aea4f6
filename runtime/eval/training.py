"""Stages 2 and 3: train (a shared base, then one fine-tune per task from it) and merge.

Training calls runtime/model/train.py's ``train`` in this process (it prints its own progress:
step, loss, steps/s). A run stopped inside the stage redoes the whole stage next time
(plan.prepare_stages): a fine-tune is only as good as the base it started from.

Merging uses build.merge_bundle with the architecture and serving (cameras, dt, prompt) that
training wrote beside the base: the merged bundle of every task, and one single-task bundle per
task (a merge of one task vector is that fine-tune itself: its mask keeps every changed weight),
which is the "expert" condition of the evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from armada.runtime.eval.plan import EvalPlan, SimTask
from armada.runtime.eval.progress import duration_text


def train_stage(plan: EvalPlan, dataset: Path, repo_id: str, out: Path) -> dict[str, Any]:
    """The base on every task, then each task from the base; returns {name: checkpoint dir, seconds}."""
    from armada.runtime.model.train import train

    summary: dict[str, Any] = {"base": str(out / "base"), "tasks": {}, "seconds": {}}
    jobs: list[tuple[str, SimTask | None, int]] = [("base", None, plan.base_steps)]
    jobs += [(task.name, task, plan.task_steps) for task in plan.tasks]
    for i, (name, task, steps) in enumerate(jobs):
        target = out / name
        print(f"train {i + 1}/{len(jobs)}: {name} ({steps} steps"
              f"{', from the base' if task is not None else ', every task'}) -> {target}", flush=True)
        t = time.monotonic()
        # The dataset's task string is the instruction; the checkpoint is named after the scene's
        # task, so the router's answer and `episode_start task=` use the scene's names.
        train(dataset, target, repo_id=repo_id, task=task.instruction if task is not None else None,
              name=task.name if task is not None else None, init=out / "base" if task is not None else None,
              size=plan.size, steps=steps, batch=plan.batch, lr=plan.lr, actions=plan.actions, seed=plan.seed,
              overwrite=True,
              progress=lambda line, name=name: print(f"train {name}: {line}", flush=True))
        seconds = time.monotonic() - t
        summary["seconds"][name] = round(seconds, 1)
        if task is not None:
            summary["tasks"][task.name] = str(target)
        print(f"train {name}: done in {duration_text(seconds)}", flush=True)
    return summary


def merge_stage(plan: EvalPlan, base: Path, task_dirs: dict[str, Path], out: Path) -> dict[str, Any]:
    """The merged bundle of every task, then one single-task bundle per task."""
    from armada.runtime.model import build
    from armada.runtime.model.mergevla import MergeVLAConfig
    from armada.runtime.model.train import read_serving

    architecture = MergeVLAConfig.from_dict(json.loads((base / "architecture.json").read_text()))
    serving = read_serving(base)
    ordered = [task_dirs[t.name] for t in plan.tasks]
    bundles: dict[str, Any] = {"merged": str(out / "merged"), "experts": {}}
    jobs: list[tuple[Path, list[Path]]] = [(out / "merged", ordered)]
    for task in plan.tasks:
        bundles["experts"][task.name] = str(out / f"expert-{task.name}")
        jobs.append((out / f"expert-{task.name}", [task_dirs[task.name]]))
    for i, (target, tasks) in enumerate(jobs):
        t = time.monotonic()
        build.merge_bundle(base, tasks, target, architecture=architecture, serving=serving, overwrite=True)
        print(f"merge {i + 1}/{len(jobs)}: {target.name} ({len(tasks)} task(s)) in {time.monotonic() - t:.1f} s",
              flush=True)
    return bundles
