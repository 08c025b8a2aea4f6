"""ALOHA as a backend plugin: dynamixel_sdk in a worker process (drivers/aloha/backend.py says why),
imported only when a driver is built."""

from __future__ import annotations

from typing import Any

import numpy as np

from armada.drivers.aloha.config import ARM_JOINTS, JOINT_CALIBRATION_KIND, AlohaBackendConfig, settings
from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext


def check_embodiment(cfg: AlohaBackendConfig, emb: Any) -> None:
    """Two arms of six joints and a gripper each, left first, named as ALOHA's code names them."""
    expected = [f"{side}_{j}" for side in ("left", "right") for j in (*ARM_JOINTS, "gripper")]
    if emb.joint_names != expected:
        raise ValueError(f"ALOHA backend needs the joints {expected} in this order; embodiment {emb.name!r} has "
                         f"{emb.joint_names}")
    mask = np.array(([False] * len(ARM_JOINTS) + [True]) * 2)
    if not np.array_equal(emb.gripper_mask(), mask):
        raise ValueError(f"ALOHA embodiment {emb.name!r}: the grippers must be gripper_position groups and nothing "
                         f"else; gripper mask is {emb.gripper_mask().tolist()}")


def check_gripper_ranges(grippers: dict[str, dict[str, float]], emb: Any) -> None:
    """Each follower gripper's range in the embodiment must lie within its calibrated closed..open
    span: a goal the driver allows beyond it would be extrapolated past the gripper's end stop."""
    for k, side in enumerate(("left", "right")):
        g = grippers[side]
        j = k * (len(ARM_JOINTS) + 1) + len(ARM_JOINTS)
        lo, hi = float(emb.lower[j]), float(emb.upper[j])
        span = sorted((g["closed_m"], g["open_m"]))
        tol = 1e-6
        if lo < span[0] - tol or hi > span[1] + tol:
            raise ValueError(f"ALOHA {side} gripper: the embodiment allows {lo:g}..{hi:g} m but its calibration "
                             f"spans {span[0]:g}..{span[1]:g} m (closed..open): narrow the embodiment's gripper range "
                             "or recalibrate (armada calibrate joints aloha-gripper)")


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.core.isolated import IsolatedBackend, WorkerTimeouts

    check_embodiment(ctx.driver.backend, ctx.embodiment)
    b: AlohaBackendConfig = ctx.driver.backend
    # A read is 2 sync reads per follower bus (plus 1 per leader bus with leaders_in_state): a few ms
    # on a real 1 Mbaud bus with 1 ms adapters (`armada bench aloha`). One 50 Hz tick before it is late.
    timeouts = WorkerTimeouts(io_s=0.02)
    plain = settings(ctx)
    check_gripper_ranges(plain["grippers"], ctx.embodiment)
    return IsolatedBackend("armada.drivers.aloha.backend:build_in_worker", plain,
                           f"ALOHA on {b.left_follower_port}, {b.right_follower_port}", timeouts=timeouts,
                           realtime_priority=ctx.driver.realtime_priority,
                           lost_link_note="; the servos keep their last goal with torque on")


def fake(argv: list[str]) -> int:
    from armada.drivers.aloha.fake.aloha import main

    return main(argv)


def bench(seconds: float) -> dict[str, Any]:
    from armada.drivers.aloha.bench import bench_aloha

    return bench_aloha(seconds)


PLUGIN = BackendPlugin(kind="aloha", config_model=AlohaBackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment, joint_calibration_kind=JOINT_CALIBRATION_KIND,
                       fake=fake, bench=bench)
