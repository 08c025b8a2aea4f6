"""The UR3 as a backend plugin (ur-rtde, in a worker process; imported only when built)."""

from __future__ import annotations

from typing import Any

from armada.drivers.core.backend import Backend
from armada.drivers.core.registry import BackendPlugin, BuildContext
from armada.drivers.ur3.config import UR3BackendConfig, check_embodiment


def build(ctx: BuildContext) -> Backend:
    from armada.drivers.ur3.backend import make_ur3_backend

    return make_ur3_backend(ctx.driver.backend, ctx.embodiment, realtime_priority=ctx.driver.realtime_priority)


def fake(argv: list[str]) -> int:
    from armada.drivers.ur3.fake.controller import main

    return main(argv)


def bench(seconds: float) -> dict[str, Any]:
    from armada.drivers.ur3.bench import bench_ur3

    return bench_ur3(max(seconds, 5.0))


PLUGIN = BackendPlugin(kind="ur3", config_model=UR3BackendConfig, build=build, moves_hardware=True,
                       check_embodiment=check_embodiment, fake=fake, bench=bench)
