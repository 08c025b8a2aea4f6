"""armada eval's cell copies: a bundle's chunking and an absolute bundle path in the policy, the rest
of the cell unchanged; a cell without a simulated arm is refused, saying what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from armada.runtime.config import DEFAULT_CELL, load_cell
from armada.runtime.eval.cells import bundle_tasks, policy_cell, read_cell_yaml, sim_site


def _bundle(folder: Path, chunk: int = 12, dt: float = 0.1) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "action": {"dim": 7, "chunk": chunk, "dt": dt},
        "tasks": [{"name": "reach_cube", "instruction": "touch the red cube"},
                  {"name": "press_button", "instruction": "press the green button"}]}))
    return folder


def test_policy_cell_runs_the_bundle_with_its_chunking(tmp_path):
    bundle = _bundle(tmp_path / "merged")
    out = policy_cell(DEFAULT_CELL, bundle, "default-merged", tmp_path / "cells" / "merged.yaml")
    cell = load_cell(out)
    assert cell.name == "default-merged"
    assert cell.inference.policy.kind == "mergevla" and Path(cell.inference.policy.bundle) == bundle.resolve()
    assert (cell.inference.chunking.size, cell.inference.chunking.dt) == (12, 0.1)
    assert cell.inference.chunking.execute == 8 and cell.inference.chunking.mode == "async"  # the cell's own
    original = yaml.safe_load(DEFAULT_CELL.read_text())
    written = yaml.safe_load(out.read_text())
    assert written["drivers"] == original["drivers"] and written["cameras"] == original["cameras"]
    assert bundle_tasks(bundle) == {"reach_cube": "touch the red cube", "press_button": "press the green button"}


def test_relative_embodiment_paths_become_absolute(tmp_path):
    data = yaml.safe_load(DEFAULT_CELL.read_text())
    emb = DEFAULT_CELL.parent.parent / "embodiments" / "mock_arm.yaml"
    (tmp_path / "embodiments").mkdir()
    (tmp_path / "embodiments" / "arm.yaml").write_text(emb.read_text())
    data["drivers"][0]["embodiment"] = "embodiments/arm.yaml"
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(data))
    copied = read_cell_yaml(tmp_path / "cell.yaml")
    assert copied["drivers"][0]["embodiment"] == str((tmp_path / "embodiments" / "arm.yaml").resolve())


def test_a_cell_without_a_simulated_arm_is_refused():
    with pytest.raises(ValueError, match=r"needs a simulated cell.*arm: mock.*--sim"):
        sim_site(DEFAULT_CELL)
