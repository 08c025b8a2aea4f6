"""`armada eval CELL`: demos -> train -> merge -> eval on a simulated cell, then the table.

Layout of the work folder:

    plan.json                     the run's parameters (tasks, budgets, seeds)
    demos/dataset/                the LeRobotDataset of successful expert demos; demos/cell.yaml
    train/base/, train/<task>/    checkpoints (armada task-checkpoint layout + architecture/serving)
    merge/merged/, merge/expert-<task>/   bundles
    eval/cells/<condition>.yaml   the cells the episodes ran on; eval/episodes.jsonl one line per episode
    results.json, results.md      the table and the targets

Each stage folder holds ``done.json`` once finished (see plan.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from armada.runtime.eval import cells as cellfiles
from armada.runtime.eval.episodes import EpisodeResult
from armada.runtime.eval.plan import STAGES, EvalPlan, mark_done, prepare_stages, stage_done
from armada.runtime.eval.progress import Progress, duration_text
from armada.runtime.eval.report import (EXPERT, PINNED, ROUTED, build_results, failure_lines, markdown, table_lines,
                                        target_lines)


@dataclass(frozen=True)
class Options:
    cell: Path
    work: Path | None
    demos: int
    episodes: int
    base_steps: int
    task_steps: int
    seed: int
    redo: str | None
    duration_s: float | None = None
    batch: int = 32
    size: str = "sim-tiny"
    lr: float = 1e-3
    actions: str = "relative"
    run_dir: Path | None = None


def make_plan(opts: Options) -> tuple[EvalPlan, cellfiles.SimSite]:
    from armada.runtime.config import load_cell

    cell_path = opts.cell.resolve()
    site = cellfiles.sim_site(cell_path)
    cell = load_cell(cell_path)
    work = (opts.work or Path.cwd() / f"eval-{cell.name}").resolve()
    plan = EvalPlan(cell=cell_path, work=work, tasks=cellfiles.scene_tasks(site.scene), demos=opts.demos,
                    episodes=opts.episodes, base_steps=opts.base_steps, task_steps=opts.task_steps, seed=opts.seed,
                    duration_s=opts.duration_s or cell.inference.episode_duration_s, batch=opts.batch,
                    size=opts.size, lr=opts.lr, actions=opts.actions, run_dir=opts.run_dir.resolve() if opts.run_dir else None)
    return plan, site


def run_pipeline(opts: Options) -> dict[str, Any]:
    plan, site = make_plan(opts)
    plan.work.mkdir(parents=True, exist_ok=True)
    (plan.work / "plan.json").write_text(json.dumps(plan.as_dict() | {"seeds": plan.seeds_text()}, indent=2))
    print(f"eval: {plan.cell.name}, scene {site.scene}, tasks "
          + ", ".join(f"{t.name} ({t.instruction!r})" for t in plan.tasks), flush=True)
    print(f"eval: work folder {plan.work}", flush=True)
    print(f"eval: {plan.demos} demos per task, {plan.base_steps} base steps, {plan.task_steps} steps per task, "
          f"{plan.episodes} episodes per task and condition (at most {plan.duration_s:.0f} s each)", flush=True)
    print(f"eval: {plan.seeds_text()}", flush=True)
    to_run = prepare_stages(plan, opts.redo)
    stages: dict[str, Any] = {}
    started = time.monotonic()
    for stage in STAGES:
        if stage not in to_run:
            stages[stage] = stage_done(plan, stage)
            print(f"eval: stage {stage}: reused (finished earlier; --redo {stage} redoes it)", flush=True)
            continue
        print(f"eval: stage {stage} ...", flush=True)
        t = time.monotonic()
        summary = _run_stage(stage, plan, site, stages)
        summary["stage_seconds"] = round(time.monotonic() - t, 1)
        mark_done(plan, stage, summary)
        stages[stage] = summary
        print(f"eval: stage {stage} done in {duration_text(time.monotonic() - t)}", flush=True)
    episodes = stages["eval"]["episodes"]
    plan_info = plan.as_dict() | {"task_names": [t.name for t in plan.tasks], "seeds": plan.seeds_text()}
    results = build_results(plan_info, {k: {kk: vv for kk, vv in v.items() if kk != "episodes"}
                                        for k, v in stages.items()}, episodes, [t.name for t in plan.tasks])
    (plan.work / "results.json").write_text(json.dumps(results, indent=2))
    (plan.work / "results.md").write_text(markdown(results))
    print(f"eval: finished in {duration_text(time.monotonic() - started)}", flush=True)
    return results


def print_results(results: dict[str, Any], work: Path) -> None:
    from armada.runtime.eval.report import Row, Target

    print()
    print("\n".join(table_lines([Row(**r) for r in results["rows"]])))
    print()
    print("\n".join(target_lines([Target(**t) for t in results["targets"]])))
    print()
    failures = failure_lines(results["episodes"])
    if failures:
        print("failed episodes (counted as no success):")
        print("\n".join(failures))
        print()
    print(f"seeds: {results['plan']['seeds']}")
    print(f"results: {work / 'results.json'}, {work / 'results.md'}")


def _run_stage(stage: str, plan: EvalPlan, site: cellfiles.SimSite, stages: dict[str, Any]) -> dict[str, Any]:
    folder = plan.stage_dir(stage)
    if stage == "demos":
        from armada.runtime.eval.demos import record_demos

        cell = cellfiles.demo_cell(plan.cell, site, f"{_cell_name(plan)}-demos", folder / "cell.yaml")
        return record_demos(plan, cell, _run_dir(plan), site.driver, site.control, folder / "dataset")
    if stage == "train":
        from armada.runtime.eval.training import train_stage

        demos = stages["demos"]
        return train_stage(plan, Path(demos["dataset"]), demos["repo_id"], folder)
    if stage == "merge":
        from armada.runtime.eval.training import merge_stage

        trained = stages["train"]
        return merge_stage(plan, Path(trained["base"]), {k: Path(v) for k, v in trained["tasks"].items()}, folder)
    return {"episodes": eval_stage(plan, site, stages["merge"], folder)}


def _cell_name(plan: EvalPlan) -> str:
    from armada.runtime.config import load_cell

    return load_cell(plan.cell).name


def _run_dir(plan: EvalPlan) -> Path:
    from armada.runtime.rundir import resolve_run_dir

    return resolve_run_dir(plan.run_dir, f"{_cell_name(plan)}-eval")


# --------------------------------------------------------------------------- stage 4


MAX_RESTARTS = 3  # per session: a cell that keeps breaking is a bug to look at, not to retry


@dataclass(frozen=True)
class Session:
    """One started cell and what runs on it: (task, condition, pin) for each block of episodes."""

    name: str
    bundle: Path
    blocks: tuple[tuple[str, str, str | None], ...]


def sessions(plan: EvalPlan, bundles: dict[str, Any]) -> list[Session]:
    """The expert bundles each on their own task; the merged bundle routed and pinned on every task."""
    out = [Session(f"expert-{t.name}", Path(bundles["experts"][t.name]), ((t.name, EXPERT, None),))
           for t in plan.tasks]
    merged = Path(bundles["merged"])
    names = cellfiles.bundle_tasks(merged)
    blocks = []
    for t in plan.tasks:
        pin = _bundle_task(names, t.name, t.instruction, merged)
        blocks += [(t.name, ROUTED, None), (t.name, PINNED, pin)]
    out.append(Session("merged", merged, tuple(blocks)))
    return out


def _bundle_task(names: dict[str, str], task: str, instruction: str, bundle: Path) -> str:
    """The bundle's name for a scene task: the same name, else the task trained on the same instruction."""
    if task in names:
        return task
    same = [n for n, ins in names.items() if ins == instruction]
    if len(same) != 1:
        raise ValueError(f"{bundle}: no single task matches scene task {task!r} ({instruction!r}); "
                         f"the bundle has {names}")
    return same[0]


def eval_stage(plan: EvalPlan, site: cellfiles.SimSite, bundles: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    plan_sessions = sessions(plan, bundles)
    total = sum(len(s.blocks) for s in plan_sessions) * plan.episodes
    progress = Progress("eval", total)
    results: list[dict[str, Any]] = []
    log = folder / "episodes.jsonl"
    for session in plan_sessions:
        cell = cellfiles.policy_cell(plan.cell, session.bundle, f"{_cell_name(plan)}-{session.name}",
                                     folder / "cells" / f"{session.name}.yaml")
        names = cellfiles.bundle_tasks(session.bundle)
        for result in _run_session(plan, site, cell, session, names, progress):
            results.append(result)
            with log.open("a") as f:
                f.write(json.dumps(result) + "\n")
    return results


def _run_session(plan: EvalPlan, site: cellfiles.SimSite, cell: Path, session: Session, names: dict[str, str],
                 progress: Progress) -> Iterator[dict[str, Any]]:
    """The session's episodes, in order. An episode that breaks the cell (a process died, the arm
    cannot go home, no report) is recorded as failed, and the cell's processes are restarted for
    the next one, at most ``MAX_RESTARTS`` times per session."""
    from armada.runtime.eval.episodes import EvalError

    tasks = {t.name: t for t in plan.tasks}
    pending = [(tasks[task_name], condition, pin, i) for task_name, condition, pin in session.blocks
               for i in range(plan.episodes)]
    tally: dict[tuple[str, str], list[int]] = {}
    restarts = 0
    while pending:
        with _SessionCell(plan, site, cell) as episodes:
            while pending:
                task, condition, pin, i = pending[0]
                seed = plan.eval_seed(i)
                broke = False
                try:
                    r = episodes.run(task, seed, condition, plan.duration_s, pin=pin).as_dict()
                except EvalError as exc:
                    r = EpisodeResult(task.name, condition, seed, outcome=f"failed: {exc}").as_dict()
                    broke = True
                pending.pop(0)
                r["session"] = session.name
                expected = _bundle_task(names, task.name, task.instruction, session.bundle)
                r["route_ok"] = None if condition != ROUTED else r["routed_task"] == expected
                done = tally.setdefault((task.name, condition), [0, 0])
                done[0] += bool(r["success"])
                done[1] += 1
                routed = f", routed {r['routed_task']}" if condition == ROUTED else ""
                progress.step(r["success"], f"{task.name} {condition} {i + 1}/{plan.episodes} seed {seed}: "
                              f"{'success' if r['success'] else 'no success'} ({r['outcome'][:200]}{routed}); "
                              f"{done[0]}/{done[1]} so far")
                yield r
                if broke or episodes.broken():
                    break
        if pending:
            restarts += 1
            if restarts > MAX_RESTARTS:
                raise EvalError(f"session {session.name}: the cell broke {restarts} times; stopping "
                                f"(logs in {_run_dir(plan) / 'logs'})")
            print(f"eval: session {session.name}: restarting the cell's processes ({restarts}/{MAX_RESTARTS})",
                  flush=True)


class _SessionCell:
    """A started cell with a sim control client and the episode runner; all closed on exit."""

    def __init__(self, plan: EvalPlan, site: cellfiles.SimSite, cell: Path):
        self.plan, self.site, self.cell = plan, site, cell

    def __enter__(self) -> Any:
        from armada.drivers.sim.control import SimControl
        from armada.runtime.eval.demos import start_processes
        from armada.runtime.eval.episodes import SimEpisodes
        from armada.runtime.supervisor import CellProcesses

        self.procs = CellProcesses(self.cell, _run_dir(self.plan))
        self.control = self.episodes = None
        try:
            start_processes(self.procs)
            self.control = SimControl(self.site.control.replace("{run_dir}", str(self.procs.run_dir)), 2.0)
            self.episodes = SimEpisodes(self.procs, self.site.driver, self.control)
        except BaseException:
            self.__exit__()
            raise
        return self.episodes

    def __exit__(self, *exc: object) -> None:
        if self.episodes is not None:
            self.episodes.close()
        if self.control is not None:
            self.control.close()
        self.procs.close()
