"""One backend's read + write per tick, timed: what the device benches (`armada bench aloha`,
`armada bench so101`, ...) report as the achieved rate and the bus round trip per tick."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend


def stats_ms(samples_s: list[float]) -> dict[str, float]:
    a = np.asarray(samples_s) * 1e3
    return {"n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "max_ms": round(float(a.max()), 3)}


def measure_ticks(backend: Backend, seconds: float, rate_hz: float, paced: bool) -> dict[str, Any]:
    """read() + write() per tick for ``seconds`` (the write holds the measured pose: nothing moves),
    paced at ``rate_hz`` on absolute deadlines or as fast as the bus answers."""
    period = 1.0 / rate_hz
    round_trips, errors, overruns, first_error = [], 0, 0, None
    start = time.monotonic()
    deadline = start
    n = 0
    while time.monotonic() - start < seconds:
        t = time.monotonic()
        try:
            r = backend.read()
            backend.write(r.position)
        except Exception as exc:  # noqa: BLE001 (counted: a bench reports, it does not stop)
            errors += 1
            first_error = first_error or str(exc)[:200]
        round_trips.append(time.monotonic() - t)
        n += 1
        if paced:
            deadline += period
            left = deadline - time.monotonic()
            if left < 0:
                overruns += 1
                deadline = time.monotonic()
            else:
                time.sleep(left)
    elapsed = time.monotonic() - start
    out = {"round_trip": stats_ms(round_trips), "rate_hz": round(n / elapsed, 1), "errors": errors}
    if first_error:
        out["first_error"] = first_error
    if paced:
        out["overruns"] = overruns
    return out


def wait_for_leader(backend: Backend, timeout_s: float = 5.0) -> None:
    """With the leader in state it is opened in the background after connect: measure once it is read."""
    deadline = time.monotonic() + timeout_s
    extras: dict[str, Any] = {}
    while time.monotonic() < deadline:
        extras = backend.read().extras or {}
        if extras.get("leader") is not None:
            return
        time.sleep(0.02)
    raise RuntimeError(f"the leader was not read within {timeout_s} s: {extras.get('leader_error')}")


def leader_cost(out: dict[str, Any], with_leader: str, without: str) -> dict[str, float]:
    """What reading the leader adds to a tick: p50 and p99 of read+write, and the mean tick from the
    unpaced rates (every tick counted: the least noisy on a loaded host), with minus without."""
    cost = {}
    for path in ("worker_unpaced", "in_process_unpaced"):
        a, b = out[with_leader][path], out[without][path]
        cost[f"{path}_p50_ms"] = round(a["round_trip"]["p50_ms"] - b["round_trip"]["p50_ms"], 3)
        cost[f"{path}_p99_ms"] = round(a["round_trip"]["p99_ms"] - b["round_trip"]["p99_ms"], 3)
        cost[f"{path}_mean_ms"] = round(1e3 / a["rate_hz"] - 1e3 / b["rate_hz"], 3)
    cost["real_bus_estimate_ms"] = round(out[with_leader]["real_bus_estimate"]["tick_ms"]
                                         - out[without]["real_bus_estimate"]["tick_ms"], 2)
    return cost
