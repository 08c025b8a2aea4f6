"""armada eval's plan: seeds never overlap, stages reused when finished with the same parameters,
redone (with every later stage) when asked, unfinished or run with other parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from armada.runtime.eval.plan import (EVAL_SEED_OFFSET, STAGES, EvalPlan, SimTask, mark_done, prepare_stages,
                                      stage_done)


def _plan(work: Path, **kw) -> EvalPlan:
    args = dict(cell=work / "cell.yaml", work=work, tasks=(SimTask("a", "do a"), SimTask("b", "do b")), demos=3,
                episodes=2, base_steps=10, task_steps=5, seed=7, duration_s=5.0)
    return EvalPlan(**(args | kw))


def _finish(plan: EvalPlan, stages=STAGES) -> None:
    for stage in stages:
        (plan.stage_dir(stage) / "file").write_text(stage)
        mark_done(plan, stage, {"stage": stage})


def test_demo_and_eval_seeds_are_disjoint(tmp_path):
    plan = _plan(tmp_path, demos=50, episodes=40)
    demo = {plan.demo_seed(k) for k in range(plan.max_demo_attempts)}
    evals = {plan.eval_seed(i) for i in range(plan.episodes)}
    assert not demo & evals and min(evals) == 7 + EVAL_SEED_OFFSET
    assert "100007" in plan.seeds_text()
    with pytest.raises(ValueError, match="eval seeds"):
        _plan(tmp_path, demos=EVAL_SEED_OFFSET)


def test_fresh_work_folder_runs_everything(tmp_path):
    plan = _plan(tmp_path)
    assert prepare_stages(plan, None) == list(STAGES)
    assert all(plan.stage_dir(s).is_dir() for s in STAGES)


def test_finished_stages_are_reused_and_redo_clears_later_ones(tmp_path):
    plan = _plan(tmp_path)
    prepare_stages(plan, None)
    _finish(plan)
    assert prepare_stages(plan, None) == []
    assert stage_done(plan, "train")["stage"] == "train"
    assert prepare_stages(plan, "merge") == ["merge", "eval"]
    assert (plan.stage_dir("train") / "file").exists()  # kept
    assert not (plan.stage_dir("merge") / "file").exists()  # cleared
    with pytest.raises(ValueError, match="--redo"):
        prepare_stages(plan, "bogus")


def test_unfinished_stage_is_redone_with_everything_after(tmp_path):
    plan = _plan(tmp_path)
    prepare_stages(plan, None)
    _finish(plan, ("demos", "train"))
    (plan.stage_dir("train") / "done.json").unlink()  # stopped inside train
    assert prepare_stages(plan, None) == ["train", "merge", "eval"]


def test_other_parameters_redo_the_stages_they_change(tmp_path):
    plan = _plan(tmp_path)
    prepare_stages(plan, None)
    _finish(plan)
    assert prepare_stages(_plan(tmp_path, episodes=9), None) == ["eval"]
    _finish(plan, ("eval",))
    assert prepare_stages(_plan(tmp_path, task_steps=99), None) == ["train", "merge", "eval"]
    (plan.stage_dir("demos") / "done.json").write_text("{not json")
    assert prepare_stages(plan, None) == list(STAGES)
