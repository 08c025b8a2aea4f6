"""The results: one row per task and condition, the issue's targets beside them, JSON and markdown.

Conditions (``CONDITIONS``):
- ``expert``: the task's single-task bundle on its own task (routing is trivial: one task);
- ``merged+router``: the merged bundle, the router picks the task at t=0 from the instruction
  and the first observation; routing accuracy = routed task == the scene's task;
- ``merged pinned``: the merged bundle told the task (``episode_start task=``), no routing.

Targets (issue 12): routing 100 % over at least 20 episodes per task; each expert at least 80 %
success; the merged model (routed and pinned) within 10 points of its expert. Each is shown
PASS or MISS whatever the result, with why.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

EXPERT, ROUTED, PINNED = "expert", "merged+router", "merged pinned"
CONDITIONS = (EXPERT, ROUTED, PINNED)
ROUTING_TARGET = 1.0
ROUTING_MIN_EPISODES = 20
EXPERT_TARGET = 0.8
MERGED_GAP_POINTS = 10.0


@dataclass
class Row:
    task: str
    condition: str
    episodes: int
    successes: int
    success_pct: float
    routing_accuracy: float | None  # merged+router only
    chunk_latency_p50_ms: float | None
    chunk_latency_p99_ms: float | None
    clamps: int
    time_to_success_s: float | None  # mean over the successes (sim seconds)
    failed_episodes: int  # episodes whose report says failed (a fault, a timeout), counted as no success


@dataclass
class Target:
    task: str
    what: str
    goal: str
    got: str
    passed: bool
    note: str = ""


def make_rows(results: list[dict[str, Any]], tasks: list[str]) -> list[Row]:
    rows = []
    for task in tasks:
        for condition in CONDITIONS:
            mine = [r for r in results if r["task"] == task and r["condition"] == condition]
            rows.append(_row(task, condition, mine))
    return rows


def _row(task: str, condition: str, mine: list[dict[str, Any]]) -> Row:
    n = len(mine)
    successes = sum(bool(r["success"]) for r in mine)
    latencies = [ms for r in mine for ms in r.get("chunk_latencies_ms") or []]
    times = [r["time_to_success_s"] for r in mine if r["success"] and r.get("time_to_success_s") is not None]
    routing = None
    if condition == ROUTED and n:
        routing = sum(bool(r.get("route_ok")) for r in mine) / n
    return Row(task=task, condition=condition, episodes=n, successes=successes,
               success_pct=100.0 * successes / n if n else 0.0, routing_accuracy=routing,
               chunk_latency_p50_ms=float(np.percentile(latencies, 50)) if latencies else None,
               chunk_latency_p99_ms=float(np.percentile(latencies, 99)) if latencies else None,
               clamps=sum(int(r.get("clamps", 0)) for r in mine),
               time_to_success_s=float(np.mean(times)) if times else None,
               failed_episodes=sum(str(r.get("outcome", "")).startswith("failed") for r in mine))


def make_targets(rows: list[Row], tasks: list[str]) -> list[Target]:
    targets = []
    for task in tasks:
        by = {r.condition: r for r in rows if r.task == task}
        routed, expert, pinned = by[ROUTED], by[EXPERT], by[PINNED]
        acc = routed.routing_accuracy or 0.0
        enough = routed.episodes >= ROUTING_MIN_EPISODES
        targets.append(Target(task, "routing", f"100 % over >= {ROUTING_MIN_EPISODES} episodes",
                              f"{100 * acc:.0f} % over {routed.episodes}", acc >= ROUTING_TARGET and enough,
                              "" if enough else f"only {routed.episodes} episode(s)"))
        targets.append(Target(task, "expert success", f">= {100 * EXPERT_TARGET:.0f} %",
                              f"{expert.success_pct:.0f} %", expert.episodes > 0 and
                              expert.success_pct >= 100 * EXPERT_TARGET))
        for row in (routed, pinned):
            diff = row.success_pct - expert.success_pct
            targets.append(Target(task, f"{row.condition} vs expert", f"within {MERGED_GAP_POINTS:.0f} points",
                                  f"{row.success_pct:.0f} % ({diff:+.0f} points)",
                                  row.episodes > 0 and expert.episodes > 0 and -diff <= MERGED_GAP_POINTS))
    return targets


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table_lines(rows: list[Row]) -> list[str]:
    """The results table in markdown (also readable as plain text)."""
    head = ["task", "condition", "episodes", "success %", "routing accuracy", "chunk latency p50 / p99 ms",
            "clamps", "time to success s", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        routing = "-" if r.routing_accuracy is None else f"{100 * r.routing_accuracy:.0f} %"
        latency = f"{_num(r.chunk_latency_p50_ms, '.1f')} / {_num(r.chunk_latency_p99_ms, '.1f')}"
        success = f"{r.success_pct:.0f} ({r.successes}/{r.episodes})"
        lines.append(f"| {r.task} | {r.condition} | {r.episodes} | {success} | {routing} | {latency} | "
                     f"{r.clamps} | {_num(r.time_to_success_s, '.1f')} | {r.failed_episodes} |")
    return lines


def failure_lines(episodes: list[dict[str, Any]]) -> list[str]:
    """Why episodes failed, grouped (numbers masked so that one cause is one line), most frequent first."""
    causes: dict[str, int] = {}
    for e in episodes:
        outcome = str(e.get("outcome", ""))
        if outcome.startswith("failed"):
            cause = re.sub(r"\d+(\.\d+)?", "N", outcome)[:200]
            causes[cause] = causes.get(cause, 0) + 1
    return [f"- {n} x {cause}" for cause, n in sorted(causes.items(), key=lambda kv: -kv[1])]


def target_lines(targets: list[Target]) -> list[str]:
    lines = ["| task | target | goal | got | |", "|---|---|---|---|---|"]
    for t in targets:
        verdict = "PASS" if t.passed else "MISS" + (f" ({t.note})" if t.note else "")
        lines.append(f"| {t.task} | {t.what} | {t.goal} | {t.got} | {verdict} |")
    return lines


def build_results(plan: dict[str, Any], stages: dict[str, Any], results: list[dict[str, Any]],
                  tasks: list[str]) -> dict[str, Any]:
    rows = make_rows(results, tasks)
    targets = make_targets(rows, tasks)
    return {"plan": plan, "stages": stages, "rows": [asdict(r) for r in rows],
            "targets": [asdict(t) for t in targets], "episodes": results}


def markdown(results: dict[str, Any]) -> str:
    rows = [Row(**r) for r in results["rows"]]
    targets = [Target(**t) for t in results["targets"]]
    plan = results["plan"]
    lines = [
        f"# armada eval: {plan['cell']}",
        "",
        f"Tasks: {', '.join(plan['task_names'])}. Budgets: {plan['demos']} demos per task, "
        f"{plan['base_steps']} base steps, {plan['task_steps']} steps per task fine-tune "
        f"(batch {plan.get('batch', '?')}, lr {plan.get('lr', '?')}, {plan.get('actions', 'absolute')} arm actions, "
        f"size {plan.get('size', '?')}), "
        f"{plan['episodes']} episodes per task and condition of at most {plan['duration_s']:.0f} s.",
        f"Seeds: {plan['seeds']}.",
        "",
        *table_lines(rows),
        "",
        "Targets (issue 12):",
        "",
        *target_lines(targets),
        "",
    ]
    failures = failure_lines(results.get("episodes") or [])
    if failures:
        lines += ["Failed episodes (no success; the inference report's outcome):", "", *failures, ""]
    demos = results["stages"].get("demos") or {}
    for name, t in (demos.get("tasks") or {}).items():
        lines.append(f"- demos {name}: {t['kept']} kept, {t['dropped']} failed expert demo(s) dropped "
                     f"({t['attempts']} attempts)")
    secs = (results["stages"].get("train") or {}).get("seconds") or {}
    if secs:
        lines.append("- training: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    return "\n".join(lines) + "\n"
