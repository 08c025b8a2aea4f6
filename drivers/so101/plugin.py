"""SO-101 as a backend plugin: lerobot's Feetech bus in a worker process (drivers/so101/backend.py
says why), imported only when a driver is built."""

from __future__ import annotations

from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.drivers.so101.config import JOINT_CALIBRATION_KIND, JOINTS, So101BackendConfig, calibrated_ranges, settings


def check_embodiment(cfg: So101BackendConfig, emb: Any) -> None:
    """Six joints named and ordered as lerobot's SO follower names its motors; the last a gripper."""
    if emb.joint_names != list(JOINTS):
        raise ValueError(f"SO-101 backend needs the joints {list(JOINTS)} in this order; embodiment {emb.name!r} has "
                         f"{emb.joint_names}")
    mask = np.array([False] * (len(JOINTS) - 1) + [True])
    if not np.array_equal(emb.gripper_mask(), mask):
        raise ValueError(f"SO-101 embodiment {emb.name!r}: the gripper must be a gripper_position group and nothing "
                         f"else; gripper mask is {emb.gripper_mask().tolist()}")


def check_ranges(calibration: dict[str, dict[str, int]], emb: Any, what: str = "follower") -> None:
    """Each joint's range in the embodiment must lie within the arm's calibrated range (rad about its
    middle; gripper 0..1): beyond it a goal the driver allows would be clamped by the servo's own
    position limits, silently, and the joint would stop short of where the driver thinks it is."""
    bad = []
    for k, (name, (lo, hi)) in enumerate(calibrated_ranges(calibration).items()):
        elo, ehi = float(emb.lower[k]), float(emb.upper[k])
        if elo < lo - 1e-6 or ehi > hi + 1e-6:
            bad.append(f"{name} allows {elo:g}..{ehi:g} but is calibrated {lo:.4f}..{hi:.4f}")
    if bad:
        raise ValueError(f"SO-101 {what}: embodiment {emb.name!r} exceeds the calibration: {'; '.join(bad)}: narrow "
                         "the embodiment's ranges or recalibrate through the joints' whole range")


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.core.isolated import IsolatedBackend, WorkerTimeouts

    check_embodiment(ctx.driver.backend, ctx.embodiment)
    b: So101BackendConfig = ctx.driver.backend
    plain = settings(ctx)
    check_ranges(plain["calibration"], ctx.embodiment)
    # A read is two sync reads of six servos (three with leader_in_state): about 4 ms on a real 1 Mbaud
    # bus (`armada bench so101`). io_s: 1.5 ticks at 50 Hz before an answer counts as late. Importing
    # lerobot's motor modules imports torch (about 1.5 s): connect_extra_s covers it.
    timeouts = WorkerTimeouts(io_s=0.03, connect_extra_s=10.0)
    return IsolatedBackend("armada.drivers.so101.backend:build_in_worker", plain, f"SO-101 on {b.port}", timeouts=timeouts,
                           realtime_priority=ctx.driver.realtime_priority,
                           lost_link_note="; the servos keep their last goal with torque on")


def fake(argv: list[str]) -> int:
    from armada.drivers.so101.fake.so101 import main

    return main(argv)


def bench(seconds: float) -> dict[str, Any]:
    from armada.drivers.so101.bench import bench_so101

    return bench_so101(seconds)


PLUGIN = BackendPlugin(kind="so101", config_model=So101BackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment, joint_calibration_kind=JOINT_CALIBRATION_KIND,
                       fake=fake, bench=bench)
