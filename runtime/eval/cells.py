"""The cell YAMLs an evaluation runs: the simulated cell with its policy swapped per stage/condition.

Each is the user's sim cell, unchanged but for ``inference.policy`` (and the chunking a bundle
states), written into the work folder so a run can be repeated by hand with `armada run`.
Relative embodiment paths are made absolute (the copy lives in another folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from armada.runtime.config import load_cell, resolve_embodiment_path
from armada.runtime.eval.plan import SimTask

SIM_BACKEND = "mujoco"
EXPERT_POLICY = "sim_expert"


@dataclass(frozen=True)
class SimSite:
    """Where the evaluation reaches the simulation of a cell."""

    driver: str  # the sim driver's name
    scene: str
    control: str  # the control endpoint, with {run_dir} still in it


def read_cell_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a cell file holds a mapping")
    for drv in data.get("drivers") or []:
        emb = drv.get("embodiment")
        if isinstance(emb, str) and emb.endswith((".yaml", ".yml")):
            drv["embodiment"] = str(resolve_embodiment_path(emb, Path(path).parent).resolve())
    return data


def sim_site(cell_path: Path) -> SimSite:
    """The cell's simulated driver (backend kind mujoco, with a control socket); refuses others."""
    cell = load_cell(cell_path)  # validates the whole cell first
    sims = [d for d in cell.drivers if d.backend.kind == SIM_BACKEND]
    if not sims:
        kinds = ", ".join(f"{d.name}: {d.backend.kind}" for d in cell.drivers)
        raise ValueError(f"{cell_path}: armada eval needs a simulated cell (a driver with backend kind "
                         f"{SIM_BACKEND}); this one has {kinds}. `armada run CELL --sim` writes a sim twin of a real cell.")
    if len(sims) > 1:
        raise ValueError(f"{cell_path}: armada eval runs one simulated arm; this cell has {len(sims)} "
                         f"({', '.join(d.name for d in sims)})")
    drv = sims[0]
    control = getattr(drv.backend, "control", None)
    if not control:
        raise ValueError(f"{cell_path}: driver {drv.name} has no `control` endpoint; the evaluation resets the "
                         "scene through it (e.g. control: ipc://{{run_dir}}/sim-control)")
    raw = read_cell_yaml(cell_path)
    raw_control = next(d for d in raw["drivers"] if d["name"] == drv.name)["backend"]["control"]
    return SimSite(drv.name, str(drv.backend.scene), str(raw_control))


def scene_tasks(scene: str) -> tuple[SimTask, ...]:
    """The scene's tasks with their instructions (imports the world module, not mujoco's model)."""
    from armada.drivers.sim import world

    return tuple(SimTask(name, world.instruction_for(name)) for name in world.tasks_for(scene))


def write_cell(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_cell(path)  # a copy that does not load is our bug: say so here, not in a child process
    return path


def demo_cell(cell_path: Path, site: SimSite, name: str, out: Path) -> Path:
    """The sim cell driven by the scripted expert (its own policy if that already is sim_expert)."""
    data = read_cell_yaml(cell_path)
    policy = (data.get("inference") or {}).get("policy") or {}
    if policy.get("kind") != EXPERT_POLICY:
        data["inference"]["policy"] = {"kind": EXPERT_POLICY, "control": site.control, "scene": site.scene}
    data["name"] = name
    return write_cell(data, out)


def bundle_chunking(bundle: Path) -> tuple[int, float]:
    """(actions per chunk, seconds between them) that a bundle states."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return int(manifest["action"]["chunk"]), float(manifest["action"]["dt"])


def bundle_tasks(bundle: Path) -> dict[str, str]:
    """A bundle's task names -> instructions, in expert order."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    return {t["name"]: t.get("instruction", "") for t in manifest["tasks"]}


def policy_cell(cell_path: Path, bundle: Path, name: str, out: Path) -> Path:
    """The sim cell running a bundle (policy kind mergevla, chunking from the bundle)."""
    data = read_cell_yaml(cell_path)
    size, dt = bundle_chunking(bundle)
    inference = data["inference"]
    inference["policy"] = {"kind": "mergevla", "bundle": str(Path(bundle).resolve())}
    chunking = dict(inference.get("chunking") or {})
    chunking.update(size=size, dt=dt)
    if chunking.get("execute") is not None:
        chunking["execute"] = min(int(chunking["execute"]), size)
    inference["chunking"] = chunking
    data["name"] = name
    return write_cell(data, out)
