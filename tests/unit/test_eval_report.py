"""armada eval's table: one row per task and condition, pooled latencies, routing accuracy of the
routed condition only, and the issue's targets judged PASS or MISS whatever the numbers."""

from __future__ import annotations

import pytest

from armada.runtime.eval.report import EXPERT, PINNED, ROUTED, build_results, make_rows, markdown

TASKS = ["reach_cube", "press_button"]


def _ep(task, condition, success, route_ok=None, lat=(10.0, 20.0), clamps=0, outcome="stopped"):
    return {"task": task, "condition": condition, "success": success, "route_ok": route_ok,
            "chunk_latencies_ms": list(lat), "clamps": clamps, "time_to_success_s": 2.0 if success else None,
            "outcome": outcome}


def _results(n_routed=20, routed_ok=True, expert_hits=(9, 10), merged_hits=(8, 10)):
    eps = []
    for task in TASKS:
        eps += [_ep(task, EXPERT, i < expert_hits[0]) for i in range(expert_hits[1])]
        eps += [_ep(task, PINNED, i < merged_hits[0]) for i in range(merged_hits[1])]
        eps += [_ep(task, ROUTED, i < merged_hits[0] * n_routed // merged_hits[1], route_ok=routed_ok or i > 0)
                for i in range(n_routed)]
    eps[0]["clamps"], eps[0]["outcome"] = 3, "failed: driver arm died"
    return eps


def test_rows_cover_every_task_and_condition():
    rows = make_rows(_results(), TASKS)
    assert [(r.task, r.condition) for r in rows] == [(t, c) for t in TASKS for c in (EXPERT, ROUTED, PINNED)]
    expert = rows[0]
    assert (expert.episodes, expert.successes, expert.success_pct) == (10, 9, pytest.approx(90.0))
    assert expert.routing_accuracy is None and rows[2].routing_accuracy is None
    assert rows[1].routing_accuracy == 1.0
    assert expert.chunk_latency_p50_ms == pytest.approx(15.0) and expert.chunk_latency_p99_ms == pytest.approx(20.0)
    assert expert.clamps == 3 and expert.failed_episodes == 1 and expert.time_to_success_s == 2.0


def test_targets_pass_when_met():
    res = build_results({}, {}, _results(), TASKS)
    assert all(t["passed"] for t in res["targets"]), res["targets"]
    assert len(res["targets"]) == 4 * len(TASKS)


@pytest.mark.parametrize("kw, miss", [
    ({"n_routed": 10}, "routing"),  # too few episodes, even at 100 %
    ({"routed_ok": False}, "routing"),  # one wrong route
    ({"expert_hits": (7, 10)}, "expert success"),
    ({"merged_hits": (7, 10)}, "merged pinned vs expert"),  # 9 -> 7: 20 points down
])
def test_targets_miss(kw, miss):
    res = build_results({}, {}, _results(**kw), TASKS)
    missed = {t["what"] for t in res["targets"] if not t["passed"]}
    assert miss in missed


def test_empty_condition_is_a_miss_not_a_crash():
    eps = [e for e in _results() if e["condition"] != PINNED]
    res = build_results({}, {}, eps, TASKS)
    pinned = [r for r in res["rows"] if r["condition"] == PINNED][0]
    assert pinned["episodes"] == 0 and pinned["chunk_latency_p50_ms"] is None
    assert not [t for t in res["targets"] if t["what"] == "merged pinned vs expert"][0]["passed"]


def test_markdown_states_seeds_budgets_and_verdicts():
    plan = {"cell": "sim.yaml", "task_names": TASKS, "demos": 30, "base_steps": 2000, "task_steps": 1000,
            "episodes": 20, "duration_s": 12.0, "seeds": "demo seeds 0..59, eval seeds 100000..100019"}
    stages = {"demos": {"tasks": {t: {"kept": 30, "dropped": 2, "attempts": 32} for t in TASKS}},
              "train": {"seconds": {"base": 300.0}}}
    text = markdown(build_results(plan, stages, _results(), TASKS))
    assert "eval seeds 100000..100019" in text and "PASS" in text and "2 failed expert demo(s) dropped" in text
    assert text.count("| reach_cube |") == 3 + 4  # 3 table rows + 4 targets
