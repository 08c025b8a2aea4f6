"""The ARX Lift 2 as one Backend: the composite (drivers/core/composite.py) of its three devices.

Action layout (configs/embodiments/arx_lift2.yaml), 18 values:
    0-5 left arm joints (rad), 6 left gripper (m), 7-12 right arm joints, 13 right gripper,
    14 lift height (m), 15-17 base velocity vx, vy (m/s), wz (rad/s).
Parts: ``left_arm`` (0-6) and ``right_arm`` (7-13), each an ``ArmPart`` over arx5-sdk on its own
bus; ``body`` (14-17), a ``BodyPart`` over LIFT-mini (lift and base share one bus and one
interface). With ``fake: true`` the same parts run over the fakes (drivers/arx_lift2/sim.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING


from armada.drivers.arx_lift2.adapter import MecanumGeometry
from armada.drivers.arx_lift2.parts import ARM_DOF, BODY_DOF, ArmPart, BodyPart
from armada.drivers.core.composite import CompositeBackend, Part

if TYPE_CHECKING:
    from armada.drivers.arx_lift2.config import ArxLift2BackendConfig
    from armada.runtime.config import EmbodimentConfig

DOF = 2 * ARM_DOF + BODY_DOF
LAYOUT = [("left_arm", "joint_position", 6), ("left_gripper", "gripper_position", 1),
          ("right_arm", "joint_position", 6), ("right_gripper", "gripper_position", 1),
          ("lift", "lift_height", 1), ("base", "base_velocity", 3)]
LEFT, RIGHT, BODY = slice(0, ARM_DOF), slice(ARM_DOF, 2 * ARM_DOF), slice(2 * ARM_DOF, DOF)


def check_layout(emb: "EmbodimentConfig") -> None:
    """The embodiment must be the groups of LAYOUT, in that order, with those modes and sizes."""
    got = [(g.name, g.mode, len(g.joints)) for g in emb.groups]
    if got != LAYOUT:
        raise ValueError(f"ARX Lift 2 backend needs the groups (name, mode, joints) {LAYOUT}; embodiment "
                         f"{emb.name!r} has {got}")


def geometry(cfg: "ArxLift2BackendConfig") -> MecanumGeometry:
    return MecanumGeometry(cfg.wheel_radius_m, cfg.half_length_m, cfg.half_width_m)


def build_backend(cfg: "ArxLift2BackendConfig", emb: "EmbodimentConfig") -> CompositeBackend:
    check_layout(emb)
    geo = geometry(cfg)
    if cfg.fake:
        from pathlib import Path

        from armada.drivers.arx_lift2.sim import SimArm, SimBody

        if cfg.fake_dir is not None:
            Path(cfg.fake_dir).mkdir(parents=True, exist_ok=True)
        home = emb.home
        left = SimArm("left_arm", home[0:6], home[6], cfg.fake_dir, seed=1)
        right = SimArm("right_arm", home[7:13], home[13], cfg.fake_dir, seed=2)
        body = SimBody(geo, float(home[14]), cfg.fake_dir, seed=3)
        where = "fake"
    else:
        from armada.drivers.arx_lift2.arm_arx5 import Arx5Arm
        from armada.drivers.arx_lift2.body_lift import LiftMiniBody

        left, right = Arx5Arm(cfg.arm_model, cfg.left_can), Arx5Arm(cfg.arm_model, cfg.right_can)
        body = LiftMiniBody(cfg.body_can, cfg.body_type)
        where = None
    label = (lambda name, bus: f"{name} ({where or bus})")
    decel = emb.max_acceleration[BODY][1:]
    names = {"left_arm": label("left arm", cfg.left_can), "right_arm": label("right arm", cfg.right_can),
             "body": label("lift and base", cfg.body_can)}
    parts = [
        Part("left_arm", LEFT, ArmPart(left, names["left_arm"], cfg.frozen_s), names["left_arm"]),
        Part("right_arm", RIGHT, ArmPart(right, names["right_arm"], cfg.frozen_s), names["right_arm"]),
        Part("body", BODY, BodyPart(body, geo, names["body"], emb.lower[BODY], emb.upper[BODY], decel, cfg.frozen_s,
                                    cfg.base_watchdog_s), names["body"]),
    ]
    return CompositeBackend(parts, dof=DOF, name="ARX Lift 2")


def parts_of(backend: CompositeBackend) -> dict[str, object]:
    """The part backends by name (tests and tools)."""
    return {p.name: p.backend for p in backend.parts}



