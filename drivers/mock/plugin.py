"""The mock arm as a backend plugin: no device, so `armada run` may arm a cell of mock arms alone."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.runtime.config import StrictModel


class MockBackendConfig(StrictModel):
    kind: Literal["mock"] = "mock"
    tracking_time_constant_s: float = Field(default=0.02, ge=0)
    latency_s: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.0, ge=0)
    seed: int = 0


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.mock.arm import MockArm

    b = ctx.driver.backend
    return MockArm(ctx.embodiment.home, b.tracking_time_constant_s, b.latency_s, b.noise_std, b.seed)


PLUGIN = BackendPlugin(kind="mock", config_model=MockBackendConfig, build=build, moves_hardware=False)
