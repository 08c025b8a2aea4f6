"""armada eval's conditions: each expert bundle on its own task, the merged bundle routed and pinned on
every task (pinned to the bundle's name for the scene task, matched by name or by instruction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armada.runtime.eval.pipeline import _bundle_task, sessions
from armada.runtime.eval.plan import EvalPlan, SimTask
from armada.runtime.eval.report import EXPERT, PINNED, ROUTED

TASKS = (SimTask("reach_cube", "touch the red cube"), SimTask("press_button", "press the green button"))


def _bundle(folder: Path, names: dict[str, str]) -> str:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"action": {"dim": 6, "chunk": 10, "dt": 0.1},
                                                      "tasks": [{"name": n, "instruction": i} for n, i in names.items()]}))
    return str(folder)


def test_sessions_cover_every_condition(tmp_path):
    plan = EvalPlan(cell=tmp_path / "c.yaml", work=tmp_path, tasks=TASKS, demos=1, episodes=1, base_steps=1,
                    task_steps=1, seed=0, duration_s=1.0)
    merged = _bundle(tmp_path / "merged", {"touch_the_red_cube": "touch the red cube",
                                           "press_button": "press the green button"})
    bundles = {"merged": merged, "experts": {t.name: _bundle(tmp_path / t.name, {t.name: t.instruction})
                                             for t in TASKS}}
    got = sessions(plan, bundles)
    assert [s.name for s in got] == ["expert-reach_cube", "expert-press_button", "merged"]
    assert got[0].blocks == (("reach_cube", EXPERT, None),)
    assert got[2].blocks == (("reach_cube", ROUTED, None), ("reach_cube", PINNED, "touch_the_red_cube"),
                             ("press_button", ROUTED, None), ("press_button", PINNED, "press_button"))


def test_a_bundle_without_the_scene_task_is_refused():
    with pytest.raises(ValueError, match="no single task matches scene task 'reach_cube'"):
        _bundle_task({"a": "open the drawer"}, "reach_cube", "touch the red cube", Path("b"))
