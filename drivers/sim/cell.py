"""`armada run CELL --sim`: a cell's MuJoCo twin, written into the run dir.

Each driver whose embodiment has a sim scene (its joints are a scene's action layout: SO-101,
ALOHA) gets backend kind `mujoco` with a control socket; each camera becomes kind `mujoco`
rendering the same scene from the matching MJCF camera, same name, size and rate; the policy and
the inference settings are unchanged. A driver without a scene (UR3, Piper, a mock arm) is refused,
naming it. Imports no mujoco: only YAML and the cell's embodiments are read.

Limits: the cameras render the first driver's world (each sim driver steps its own physics; a
cell of two simulated arms has two worlds that do not see each other). A policy that names files
relative to the cell file must name them absolutely in the twin (the twin lives in the run dir).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Camera keys that describe a physical device or its calibration files: not carried into the twin.
_CAMERA_KEYS = ("name", "width", "height", "fps", "frames", "jpeg_quality", "frame_timeout_s",
                "first_frame_timeout_s", "reopen_backoff_s", "reopen_backoff_max_s")


def sim_cell_copy(cell_path: Path, run_dir: Path) -> Path:
    """Write the sim twin of ``cell_path`` into ``run_dir`` and return its path."""
    from armada.runtime.config import load_embodiment, resolve_embodiment_path

    cell_path = Path(cell_path)
    raw = yaml.safe_load(cell_path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("drivers"), list) or not raw["drivers"]:
        raise ValueError(f"{cell_path}: not a cell (no drivers list)")
    drivers, scenes = [], []
    for i, drv in enumerate(raw["drivers"]):
        name = drv.get("name", f"#{i}")
        emb_ref = str(drv.get("embodiment", ""))
        emb = load_embodiment(emb_ref, cell_path.parent)
        scene = scene_for_joints(list(emb.joint_names))
        if scene is None:
            raise ValueError(f"{cell_path}: driver {name!r} (embodiment {emb.name!r}) has no sim scene: only SO-101 "
                             "and ALOHA embodiments can be simulated (--sim)")
        twin = {k: v for k, v in drv.items() if k not in ("backend", "joint_calibration", "realtime_priority")}
        if Path(emb_ref).suffix in (".yaml", ".yml"):  # a file next to the cell: the twin lives elsewhere
            twin["embodiment"] = str(resolve_embodiment_path(emb_ref, cell_path.parent).resolve())
        from armada.drivers.sim.world import tasks_for

        twin["backend"] = {"kind": "mujoco", "scene": scene, "task": tasks_for(scene)[0], "seed": 0,
                           "control": f"ipc://{{run_dir}}/sim-{name}"}
        drivers.append(twin)
        scenes.append(scene)
    cameras = [_camera_twin(cam, scenes[0], drivers[0]["state"]) for cam in raw.get("cameras") or []]
    out = {**raw, "name": f"{raw.get('name', cell_path.stem)}-sim", "drivers": drivers, "cameras": cameras}
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{out['name']}.yaml"
    header = f"# The MuJoCo twin of {cell_path.resolve()} (armada run --sim); written by drivers/sim/cell.py.\n"
    path.write_text(header + yaml.safe_dump(out, sort_keys=False))
    return path


def scene_for_joints(joint_names: list[str]) -> str | None:
    """The sim scene whose action layout is exactly these joints, or None."""
    from armada.drivers.sim.world import SCENES, scene_joint_names

    for scene in SCENES:
        if scene_joint_names(scene) == joint_names:
            return scene
    return None


def mjcf_camera_for(scene: str, camera_name: str) -> str:
    """The scene's camera a real camera maps to: its own name if the scene has it, a wrist camera for
    a name with "wrist" in it (ALOHA: the left one when the name says left), else the main view."""
    from armada.drivers.sim.world import SCENE_CAMERAS

    cams = SCENE_CAMERAS[scene]
    if camera_name in cams:
        return camera_name
    if "wrist" in camera_name:
        wrists = [c for c in cams if "wrist" in c]
        side = "left" if "left" in camera_name else "right"
        return next((c for c in wrists if side in c), wrists[0])
    return cams[0]


def _camera_twin(cam: dict[str, Any], scene: str, state: str) -> dict[str, Any]:
    twin = {k: cam[k] for k in _CAMERA_KEYS if k in cam}
    return {**twin, "kind": "mujoco", "scene": scene, "camera": mjcf_camera_for(scene, str(cam.get("name", ""))),
            "state": state}
