"""The AgileX PiPer as a backend plugin (piper_sdk, in a worker process; imported only when built)."""

from __future__ import annotations

from typing import Any

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.drivers.piper.config import PiperBackendConfig, refuse_virtual_bus

N_JOINTS = 6  # plus the gripper
JOINT_CALIBRATION_KIND = "piper_zero"


def check_embodiment(cfg: PiperBackendConfig, emb: Any) -> None:
    if emb.dof != N_JOINTS + 1:
        raise ValueError(f"PiPer backend needs 7 dofs (6 joints + gripper), embodiment {emb.name} has {emb.dof}")
    refuse_virtual_bus(cfg.bustype)


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.core.isolated import IsolatedBackend
    from armada.drivers.piper.calibration import zero_offsets

    b = ctx.driver.backend
    check_embodiment(b, ctx.embodiment)
    offsets = zero_offsets(ctx.driver, ctx.cell_dir)
    kwargs = {"can_name": b.can, "bustype": b.bustype, "speed_pct": b.speed_pct, "gripper_effort": b.gripper_effort,
              "stale_s": b.stale_s, "allow_reset_on_resume": b.allow_reset_on_resume,
              "zero_offsets_rad": None if offsets is None else [float(v) for v in offsets]}
    factory = "armada.drivers.piper.backend:build_in_worker"
    if b.follow_master or b.master_in_state:  # a master arm on the bus: its watch (drivers/piper/master.py)
        factory = "armada.drivers.piper.master:build_in_worker"
        kwargs.update(follow_master=b.follow_master, master_in_state=b.master_in_state)
    return IsolatedBackend(factory, kwargs, f"PiPer on {b.can}", realtime_priority=ctx.driver.realtime_priority)


def fake(argv: list[str]) -> int:
    from armada.drivers.piper.fake.serve import main

    return main(argv)


def bench(seconds: float) -> dict[str, Any]:
    from armada.drivers.piper.bench import bench_piper

    return bench_piper(seconds)


PLUGIN = BackendPlugin(kind="piper", config_model=PiperBackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment, joint_calibration_kind=JOINT_CALIBRATION_KIND,
                       fake=fake, bench=bench)
