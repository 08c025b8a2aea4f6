"""ALOHA bus round trip and loop rate through the real dynamixel_sdk, against the fake buses.

    python -m armada.drivers.aloha.bench [--seconds 10]      (``armada bench aloha``)

What one driver tick costs the backend: ``read()`` (per follower bus a sync read of Present_Position
and one of Hardware_Error_Status; with ``leaders_in_state`` also a sync read per leader bus) and
``write()`` (a sync write of Goal_Position per follower bus).

- ``worker``: the fake in its own process, the backend in the isolated worker exactly as a driver
  process builds it (``IsolatedBackend``); ``round_trip`` is read()+write() as the loop sees it.
- ``in_process``: the backend called directly (no worker hop), same fake process.
- ``paced_50hz``: the worker path ticked on monotonic deadlines at ALOHA's 50 Hz: achieved rate and
  ticks that overran their period.
- ``unpaced_hz``: ticks back to back: how fast the loop could go on this machine.
- ``real_bus_estimate``: the same transactions' bytes on a real 1 Mbaud bus (10 bits a byte), plus
  one 1 ms USB latency-timer wait per reply (ALOHA's udev setting) and Return_Delay_Time 0: what
  bounds a real robot, since the ptys here have no wire time at all. (The X-series default return
  delay, 0.5 ms per status packet, would add 16 ms a tick on the followers alone: connect warns.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any


from armada.drivers.core.tick_bench import leader_cost, measure_ticks, wait_for_leader
from armada.drivers.aloha.backend import AlohaBackend, AlohaSettings
from armada.drivers.aloha.fake.aloha import AlohaFakeProcess
from armada.drivers.aloha.config import AlohaBackendConfig, settings
from armada.drivers.core.isolated import IsolatedBackend, WorkerTimeouts
from armada.runtime.config import load_embodiment

RATE_HZ = 50.0
CONNECT_TIMEOUT_S = 5.0


def _settings(ports: dict[str, str], leaders_in_state: bool) -> dict[str, Any]:
    cfg = AlohaBackendConfig(left_follower_port=ports["puppet_left"], right_follower_port=ports["puppet_right"],
                             left_leader_port=ports["master_left"], right_leader_port=ports["master_right"],
                             leaders_in_state=leaders_in_state, latency_timer_ms=4.0)
    ctx = SimpleNamespace(driver=SimpleNamespace(backend=cfg, joint_calibration=None),
                          embodiment=load_embodiment("aloha"), cell_dir=None)
    return settings(ctx)


def real_bus_estimate(leaders: bool) -> dict[str, Any]:
    """Bytes of one tick's transactions on a real bus, and their time at 1 Mbaud with 1 ms adapters."""
    primaries, servos = 7, 9

    def sync_read(n_ids: int, data: int) -> int:
        return (14 + n_ids) + n_ids * (11 + data)  # instruction packet + one status packet per servo

    per_follower = sync_read(primaries, 4) + sync_read(servos, 1) + (14 + primaries * 5)  # + sync write
    reads = 4
    total = 2 * per_follower
    if leaders:
        total += 2 * sync_read(primaries, 4)
        reads += 2
    wire_ms = total * 10 / 1_000_000 * 1e3
    tick_ms = wire_ms + reads * 1.0
    return {"bytes_per_tick": total, "wire_ms": round(wire_ms, 2), "usb_latency_ms": reads * 1.0,
            "tick_ms": round(tick_ms, 2), "max_rate_hz": round(1e3 / tick_ms, 0)}


def bench_aloha(seconds: float = 10.0) -> dict[str, Any]:
    per = max(1.0, seconds / 5)
    with tempfile.TemporaryDirectory(prefix="armada-aloha-bench-") as d, AlohaFakeProcess(Path(d)) as fake:
        out: dict[str, Any] = {"method": "read()+write() of the ALOHA backend (dynamixel_sdk) against the fake buses "
                                         "in their own process"}
        for leaders in (False, True):
            key = "followers_and_leaders" if leaders else "followers"
            s = _settings(fake.ports, leaders)
            worker = IsolatedBackend("armada.drivers.aloha.backend:build_in_worker", s, "ALOHA bench",
                                     timeouts=WorkerTimeouts(io_s=0.05))
            worker.connect(CONNECT_TIMEOUT_S)
            if leaders:
                wait_for_leader(worker)
            try:
                res = {"worker_paced_50hz": measure_ticks(worker, per, RATE_HZ, paced=True),
                       "worker_unpaced": measure_ticks(worker, per, RATE_HZ, paced=False)}
            finally:
                worker.close()
            direct = AlohaBackend(AlohaSettings(**s))
            direct.connect(CONNECT_TIMEOUT_S)
            if leaders:
                wait_for_leader(direct)
            try:
                res["in_process_unpaced"] = measure_ticks(direct, per / 2, RATE_HZ, paced=False)
            finally:
                direct.close()
            res["real_bus_estimate"] = real_bus_estimate(leaders)
            out[key] = res
        out["leader_cost_per_tick"] = leader_cost(out, "followers_and_leaders", "followers")
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(json.dumps(bench_aloha(args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
