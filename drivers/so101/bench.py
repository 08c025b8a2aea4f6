"""SO-101 bus round trip and loop rate through lerobot's Feetech bus, against the fake buses.

    python -m armada.drivers.so101.bench [--seconds 10]      (``armada bench so101``)

What one driver tick costs the backend: ``read()`` (a sync read of Present_Position and one of Status
from the six follower servos; with ``leader_in_state`` also a sync read of the leader's positions)
and ``write()`` (a sync write of Goal_Position).

- ``worker_paced_50hz``: the backend in the isolated worker exactly as a driver process builds it,
  ticked on monotonic deadlines at 50 Hz: achieved rate and ticks that overran their period.
- ``worker_unpaced``: ticks back to back: how fast the loop could go on this machine.
- ``in_process_unpaced``: the backend called directly (no worker hop).
- ``real_bus_estimate``: the same transactions' bytes on a real 1 Mbaud bus (10 bits a byte), with
  Return_Delay_Time 0 (lerobot's configure sets it) and ``usb_ms`` of adapter latency per reply: the
  ptys here have no wire time, so this, not the fake, bounds a real arm.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any


from armada.drivers.core.tick_bench import leader_cost, measure_ticks, wait_for_leader
from armada.drivers.core.isolated import IsolatedBackend, WorkerTimeouts
from armada.drivers.so101.backend import So101Backend, So101Settings
from armada.drivers.so101.config import JOINTS
from armada.drivers.so101.fake.so101 import So101FakeProcess

RATE_HZ = 50.0
CONNECT_TIMEOUT_S = 5.0
# A plausible SO-101 calibration (lerobot's format) for the fake arm, whose servos start at 2048.
BENCH_CALIBRATION = {n: {"id": i + 1, "drive_mode": 0, "homing_offset": 0, "range_min": lo, "range_max": hi}
                     for i, (n, (lo, hi)) in enumerate(zip(JOINTS, [(750, 3350), (900, 3200), (900, 3150),
                                                                    (900, 3200), (0, 4095), (2000, 3400)]))}


def _settings(ports: dict[str, str], leader_in_state: bool) -> dict[str, Any]:
    return {"port": ports["follower"], "calibration": BENCH_CALIBRATION, "leader_port": ports["leader"],
            "leader_calibration": BENCH_CALIBRATION, "leader_in_state": leader_in_state}


def real_bus_estimate(leader: bool, usb_ms: float = 1.0) -> dict[str, Any]:
    """Bytes of one tick's transactions on a real bus, and their time at 1 Mbaud.

    Feetech packets: instruction FF FF id len inst params sum (6 + params), status 6 + data bytes."""
    n = 6

    def sync_read(data: int) -> int:
        return (6 + 2 + n) + n * (6 + data)  # instruction (addr, len, ids) + one status packet per servo

    total = sync_read(2) + sync_read(1) + (6 + 2 + n * 3)  # positions, status, goal sync write
    reads = 2
    if leader:
        total += sync_read(2)
        reads += 1
    wire_ms = total * 10 / 1_000_000 * 1e3
    tick_ms = wire_ms + reads * usb_ms
    return {"bytes_per_tick": total, "wire_ms": round(wire_ms, 2), "usb_latency_ms": reads * usb_ms,
            "tick_ms": round(tick_ms, 2), "max_rate_hz": round(1e3 / tick_ms, 0)}


def bench_so101(seconds: float = 10.0) -> dict[str, Any]:
    per = max(1.0, seconds / 5)
    with tempfile.TemporaryDirectory(prefix="armada-so101-bench-") as d, So101FakeProcess(Path(d)) as fake:
        out: dict[str, Any] = {"method": "read()+write() of the SO-101 backend (lerobot FeetechMotorsBus) against "
                                         "the fake buses in their own process"}
        for leader in (False, True):
            s = _settings(fake.ports, leader)
            worker = IsolatedBackend("armada.drivers.so101.backend:build_in_worker", s, "SO-101 bench",
                                     timeouts=WorkerTimeouts(io_s=0.05, connect_extra_s=10.0))
            t = time.monotonic()
            worker.connect(CONNECT_TIMEOUT_S)
            res: dict[str, Any] = {"worker_connect_s": round(time.monotonic() - t, 2)}
            if leader:
                wait_for_leader(worker)
            try:
                res["worker_paced_50hz"] = measure_ticks(worker, per, RATE_HZ, paced=True)
                res["worker_unpaced"] = measure_ticks(worker, per, RATE_HZ, paced=False)
            finally:
                worker.close()
            direct = So101Backend(So101Settings(**s))
            direct.connect(CONNECT_TIMEOUT_S)
            if leader:
                wait_for_leader(direct)
            try:
                res["in_process_unpaced"] = measure_ticks(direct, per / 2, RATE_HZ, paced=False)
            finally:
                direct.close()
            res["real_bus_estimate"] = real_bus_estimate(leader)
            out["follower_and_leader" if leader else "follower"] = res
        out["leader_cost_per_tick"] = leader_cost(out, "follower_and_leader", "follower")
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(json.dumps(bench_so101(args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
