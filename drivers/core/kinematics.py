"""Forward kinematics of an embodiment's arms, for the Cartesian limits (drivers/core/workspace.py).

Each arm of ``emb.kinematics`` is a serial chain described URDF-style: every chain joint's frame is
placed at ``xyz``/``rpy`` in its parent's frame (the arm's base for the first joint, itself placed at
``base_xyz``/``base_rpy`` in the robot frame), then turns (revolute) or slides (prismatic) about
``axis`` by the joint's position. The arms become branches of ONE pinocchio model, so a tick costs one
``forwardKinematics`` call for all arms. A joint of the embodiment may appear in several chains (the
ARX Lift 2's lift carries both arms): each chain gets its own copy of that joint, fed the same value.

Check points, per arm, in this order: the wrist (the origin of the last chain joint's frame) and the
tool point (``tool_xyz`` in that frame). Only these two points are checked; links between them and
the base are not (docs/kinematics.md).

pinocchio is imported here only, and only when an embodiment has kinematics: it is the optional
``kinematics`` extra (``pip install -e '.[kinematics]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from armada.runtime.config import EmbodimentConfig

POINTS_PER_ARM = 2  # wrist, tool
POINT_NAMES = ("wrist", "tool")


def _import_pinocchio() -> Any:
    try:
        import pinocchio
    except ImportError as exc:
        raise ImportError("this embodiment describes arm kinematics (workspace box / separation limits), "
                          "which need pinocchio: pip install -e '.[kinematics]'") from exc
    return pinocchio


def _placement(pin: Any, xyz: tuple[float, float, float], rpy: tuple[float, float, float]) -> Any:
    return pin.SE3(pin.rpy.rpyToMatrix(*map(float, rpy)), np.array(xyz, dtype=np.float64))


def _joint_model(pin: Any, kind: str, axis: tuple[float, float, float], where: str) -> Any:
    a = np.array(axis, dtype=np.float64)
    norm = float(np.linalg.norm(a))
    if not np.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"kinematics {where}: axis {axis} has no direction")
    a = a / norm
    # The aligned joint types are cheaper; an unaligned one covers negative or oblique axes.
    aligned = {(1.0, 0.0, 0.0): "X", (0.0, 1.0, 0.0): "Y", (0.0, 0.0, 1.0): "Z"}.get(tuple(a.tolist()))
    if kind == "revolute":
        return getattr(pin, f"JointModelR{aligned}")() if aligned else pin.JointModelRevoluteUnaligned(a)
    return getattr(pin, f"JointModelP{aligned}")() if aligned else pin.JointModelPrismaticUnaligned(a)


class ArmKinematics:
    """Forward kinematics of all arms of an embodiment, fed action-layout position vectors."""

    def __init__(self, emb: EmbodimentConfig):
        if emb.kinematics is None:
            raise ValueError(f"embodiment {emb.name} has no kinematics section")
        pin = _import_pinocchio()
        self._pin = pin
        self.arm_names = [arm.name for arm in emb.kinematics.arms]
        index = {name: i for i, name in enumerate(emb.joint_names)}
        model = pin.Model()
        q_index: list[int] = []  # action-layout index of each model dof, in model order
        self._last_joint: list[int] = []
        tools = []
        for arm in emb.kinematics.arms:
            parent = 0  # the universe: every arm is its own branch
            for k, jc in enumerate(arm.chain):
                placement = _placement(pin, jc.xyz, jc.rpy)
                if k == 0:
                    placement = _placement(pin, arm.base_xyz, arm.base_rpy) * placement
                jm = _joint_model(pin, jc.type, jc.axis, f"arm {arm.name} joint {jc.joint}")
                parent = model.addJoint(parent, jm, placement, f"{arm.name}/{jc.joint}")
                q_index.append(index[jc.joint])
            self._last_joint.append(parent)
            tools.append(np.array(arm.tool_xyz, dtype=np.float64))
        self.model = model
        self.data = model.createData()
        self._oMi = self.data.oMi  # a view of data's placements, updated in place by forwardKinematics
        self.q_index = np.array(q_index, dtype=np.intp)
        self._tools = tools
        # Action-layout indices that move some check point: the guard needs only these.
        self.used = np.unique(self.q_index)

    @property
    def n_arms(self) -> int:
        return len(self.arm_names)

    def points(self, position: np.ndarray) -> np.ndarray:
        """Check points (n_arms, 2, 3) in the robot frame at the action-layout ``position``."""
        q = np.asarray(position, dtype=np.float64)[self.q_index]
        return np.array(self.points_q(q)).reshape(self.n_arms, POINTS_PER_ARM, 3)

    def points_q(self, q: np.ndarray) -> list[list[float]]:
        """Check points as [x, y, z] lists: wrist, tool of the first arm, then the next arm's, at the
        model configuration ``q`` (``position[q_index]``). The guard's per-tick call: one
        forwardKinematics, two placement reads per arm, plain floats after that (for a handful of
        points Python floats cost less than numpy's per-call overhead)."""
        self._pin.forwardKinematics(self.model, self.data, q)
        pts = []
        for j, tool in zip(self._last_joint, self._tools):
            m = self._oMi[j]
            pts.append(m.translation.tolist())
            pts.append(m.act(tool).tolist())
        return pts

    def tool_pose(self, position: np.ndarray, arm: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(rotation 3x3, tool point) of one arm in the robot frame: for checks against vendor FK."""
        q = np.asarray(position, dtype=np.float64)[self.q_index]
        self._pin.forwardKinematics(self.model, self.data, q)
        m = self.data.oMi[self._last_joint[arm]]
        return m.rotation.copy(), m.rotation @ self._tools[arm] + m.translation

