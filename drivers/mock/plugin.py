"""The mock arm as a backend plugin: no device, so `armada run` may arm a cell of mock arms alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.runtime.config import StrictModel

if TYPE_CHECKING:
    from armada.drivers.mock.leader import ScriptedLeader


class MockLeaderConfig(StrictModel):
    """A scripted leader arm (drivers/mock/leader.py), published as device["leader"] for teleop tests."""

    amplitude: float = Field(default=0.2, ge=0, le=3)  # joint units (rad), arm joints
    gripper_amplitude: float = Field(default=0.0, ge=0, le=1)  # gripper units
    frequency_hz: float = Field(default=0.25, ge=0, le=5)
    offset: list[float] | None = None  # added to the embodiment's home, per joint (None: zeros)
    # While this file exists the leader reads as unplugged (leader None, leader_error says why).
    # Use {run_dir}/... so each run has its own.
    unplug_file: str | None = None
    # The arm obeys the leader by itself, as Cobot Magic's puppets do: teleop must only watch.
    follows_in_hardware: bool = False


class MockBackendConfig(StrictModel):
    kind: Literal["mock"] = "mock"
    tracking_time_constant_s: float = Field(default=0.02, ge=0)
    latency_s: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0)
    seed: int = 0
    leader: MockLeaderConfig | None = None


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.mock.arm import MockArm

    b = ctx.driver.backend
    return MockArm(ctx.embodiment.home, b.tracking_time_constant_s, b.latency_s, b.noise_std, b.seed,
                   leader=_leader(b.leader, ctx) if b.leader is not None else None)


def _leader(cfg: MockLeaderConfig, ctx: BuildContext) -> "ScriptedLeader":
    import numpy as np

    from armada.drivers.mock.leader import ScriptedLeader

    emb = ctx.embodiment
    offset = np.zeros(emb.dof) if cfg.offset is None else np.array(cfg.offset, dtype=np.float64)
    if offset.shape != (emb.dof,):
        raise ValueError(f"mock leader: offset needs {emb.dof} values (one per joint), got {len(cfg.offset or [])}")
    return ScriptedLeader(emb.home, emb.lower, emb.upper, emb.gripper_mask(), cfg.amplitude, cfg.gripper_amplitude,
                          cfg.frequency_hz, offset, cfg.unplug_file, cfg.follows_in_hardware)


PLUGIN = BackendPlugin(kind="mock", config_model=MockBackendConfig, build=build, moves_hardware=False)
