"""What a cell records: LeRobot features named after the embodiment's groups and joints.

- ``observation.state`` (measured) and ``action`` (commanded after the safety filter) are float32
  vectors, the cell's drivers concatenated in cell order; each element is named
  ``<group>.<joint>`` (one driver) or ``<driver>.<group>.<joint>`` (several drivers).
- ``observation.images.<camera>``: one video per camera, height x width x 3.
- ``intervention``: bool per frame, True while the operator had taken over an autonomous episode.
- fps: ``--fps``, else the cameras' fps (all equal; the lowest when they differ, so no camera is
  asked for frames it does not have), else 30 for a cell without cameras. LeRobot needs an integer.
- robot_type: the embodiment's name; several different embodiments are joined with '+'.
"""

from __future__ import annotations

from dataclasses import dataclass

from armada.runtime.config import CellConfig

DEFAULT_FPS = 30


@dataclass
class RecordLayout:
    fps: int
    robot_type: str
    joint_names: list[str]
    cameras: dict[str, tuple[int, int]]  # name -> (height, width)
    drivers: list[str]

    def features(self) -> dict[str, dict]:
        n = len(self.joint_names)
        feats: dict[str, dict] = {
            "observation.state": {"dtype": "float32", "shape": (n,), "names": list(self.joint_names)},
            "action": {"dtype": "float32", "shape": (n,), "names": list(self.joint_names)},
            "intervention": {"dtype": "bool", "shape": (1,), "names": None},
        }
        for cam, (h, w) in self.cameras.items():
            feats[f"observation.images.{cam}"] = {"dtype": "video", "shape": (h, w, 3),
                                                  "names": ["height", "width", "channels"]}
        return feats


def record_layout(cell: CellConfig, fps: int | None = None) -> RecordLayout:
    names: list[str] = []
    robot_types: list[str] = []
    several = len(cell.drivers) > 1
    for drv in cell.drivers:
        emb = cell.embodiment(drv)
        if emb.name not in robot_types:
            robot_types.append(emb.name)
        prefix = f"{drv.name}." if several else ""
        names += [f"{prefix}{g.name}.{j.name}" for g in emb.groups for j in g.joints]
    cams = {c.name: (c.height, c.width) for c in cell.cameras}
    if fps is None:
        fps = int(round(min(c.fps for c in cell.cameras))) if cell.cameras else DEFAULT_FPS
    if fps < 1:
        raise ValueError(f"recording fps must be at least 1, got {fps}")
    return RecordLayout(int(fps), "+".join(robot_types), names, cams, [d.name for d in cell.drivers])
