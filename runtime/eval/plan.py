"""What one `armada eval` run does: tasks, budgets, seeds, and the stages in its work folder.

Stages run in order (demos, train, merge, eval). Each writes into ``WORK/<stage>/`` and finishes
by writing ``WORK/<stage>/done.json`` (its summary); a finished stage is reused on the next run.
A stage found without its marker (an earlier run stopped inside it), or whose marker records
other parameters than this run's (``stage_params``: --demos, --base-steps, --episodes, ...), is
cleared and redone, as is every stage from ``--redo STAGE`` on: a later stage is built from an
earlier one's files, so it can never outlive them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STAGES = ("demos", "train", "merge", "eval")
DONE_FILE = "done.json"
# Eval episodes use seeds from here on, demos below it: a demo scene is never an eval scene.
EVAL_SEED_OFFSET = 100_000
DEMO_ATTEMPTS_FACTOR = 2  # a task's demos stop after this many attempts per wanted demo
STOP_AFTER_SUCCESS_S = 0.5  # an episode runs on this long after the sim reports success


@dataclass(frozen=True)
class SimTask:
    name: str  # the world's task name (reach_cube)
    instruction: str  # what the policy is told ("touch the red cube")


@dataclass(frozen=True)
class EvalPlan:
    cell: Path  # the simulated cell (absolute)
    work: Path  # the work folder (absolute)
    tasks: tuple[SimTask, ...]
    demos: int  # successful expert demonstrations per task
    episodes: int  # evaluation episodes per task and condition
    base_steps: int
    task_steps: int
    seed: int
    duration_s: float  # the longest an episode runs
    batch: int = 32
    size: str = "sim-tiny"
    lr: float = 1e-3  # the base's and every fine-tune's peak learning rate
    actions: str = "relative"  # the arm joints' targets relative to the observed state, or absolute
    run_dir: Path | None = None  # sockets and logs of the cell's processes (None: the default run dir)

    def __post_init__(self) -> None:
        if self.demos < 1 or self.episodes < 1:
            raise ValueError(f"--demos and --episodes must be at least 1 (got {self.demos}, {self.episodes})")
        if self.max_demo_attempts > EVAL_SEED_OFFSET:
            raise ValueError(f"--demos {self.demos} would reach the eval seeds (demo seeds stay below "
                             f"seed + {EVAL_SEED_OFFSET})")
        if not self.tasks:
            raise ValueError(f"{self.cell}: the simulated scene has no tasks")

    @property
    def max_demo_attempts(self) -> int:
        return DEMO_ATTEMPTS_FACTOR * self.demos

    def demo_seed(self, attempt: int) -> int:
        return self.seed + attempt

    def eval_seed(self, episode: int) -> int:
        return self.seed + EVAL_SEED_OFFSET + episode

    def seeds_text(self) -> str:
        return (f"demo seeds {self.seed}..{self.seed + self.max_demo_attempts - 1} (seed + attempt), "
                f"eval seeds {self.eval_seed(0)}..{self.eval_seed(self.episodes - 1)} (seed + {EVAL_SEED_OFFSET} + "
                f"episode), the same per task and condition")

    def stage_dir(self, stage: str) -> Path:
        return self.work / stage

    def stage_params(self, stage: str) -> dict[str, Any]:
        """What a stage's result depends on (besides the stages before it)."""
        if stage == "demos":
            return {"cell": str(self.cell), "tasks": [t.name for t in self.tasks], "demos": self.demos,
                    "seed": self.seed, "duration_s": self.duration_s}
        if stage == "train":
            return {"base_steps": self.base_steps, "task_steps": self.task_steps, "size": self.size,
                    "batch": self.batch, "seed": self.seed, "lr": self.lr, "actions": self.actions}
        if stage == "eval":
            return {"episodes": self.episodes, "seed": self.seed, "duration_s": self.duration_s}
        return {}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cell"], d["work"] = str(self.cell), str(self.work)
        d["run_dir"] = str(self.run_dir) if self.run_dir else None
        return d


def stage_done(plan: EvalPlan, stage: str) -> dict[str, Any] | None:
    """The finished stage's summary, or None when it has not finished with this plan's parameters."""
    marker = plan.stage_dir(stage) / DONE_FILE
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except ValueError:
        return None  # a marker cut short: the stage did not finish
    if not isinstance(done, dict) or done.get("params") != plan.stage_params(stage):
        return None
    return done


def mark_done(plan: EvalPlan, stage: str, summary: dict[str, Any]) -> None:
    marker = plan.stage_dir(stage) / DONE_FILE
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary | {"params": plan.stage_params(stage)}, indent=2))
    tmp.replace(marker)  # atomic: a marker is whole or absent


def prepare_stages(plan: EvalPlan, redo: str | None) -> list[str]:
    """Clear the stages that must run (from ``redo`` on, and from the first unfinished one on);
    returns the stages to run, in order."""
    if redo is not None and redo not in STAGES:
        raise ValueError(f"--redo must be one of {', '.join(STAGES)}, got {redo!r}")
    first = STAGES.index(redo) if redo is not None else len(STAGES)
    for i, stage in enumerate(STAGES):
        if stage_done(plan, stage) is None:
            first = min(first, i)
            break
    to_run = list(STAGES[first:])
    for stage in to_run:
        folder = plan.stage_dir(stage)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    return to_run
