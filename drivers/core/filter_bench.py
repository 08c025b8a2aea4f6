"""`armada bench filter`: what the driver's filter costs per tick, per embodiment, with and without
the Cartesian guard (workspace box, separation), on a slow and a fast target stream.

- slow: a 0.3 Hz sine over a tenth of each position joint's range around home (nothing refused);
- fast: a new random target in the range every second (full speed: many steps refused by the guard).
A base's velocity entries get a slow sine within a third of their bounds in both streams.
Pure computation: no processes, no sockets; the numbers are the filter's own.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from armada.drivers.core.filters import build_filter
from armada.drivers.core.modes import build_group_filter
from armada.runtime.config import CONFIG_DIR, load_embodiment


def shipped_embodiments() -> tuple[str, ...]:
    """Every embodiment under configs/embodiments/ (the core names no device itself)."""
    return tuple(sorted(p.stem for p in (CONFIG_DIR / "embodiments").glob("*.yaml")))


def _targets(emb: Any, kind: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    dt = 1.0 / emb.control_rate_hz
    n = int(seconds / dt)
    t = np.arange(n)[:, None] * dt
    lo, hi, home = emb.lower + emb.position_margin, emb.upper - emb.position_margin, emb.home
    base = np.array([g.mode == "base_velocity" for g in emb.groups for _ in g.joints])
    if kind == "slow":
        out = home + 0.1 * (hi - lo) / 2 * np.sin(2 * np.pi * 0.3 * t)
    else:
        every = max(1, int(1.0 / dt))
        picks = rng.uniform(lo, hi, size=(n // every + 1, emb.dof))
        out = picks[np.arange(n) // every]
    out[:, base] = (emb.upper[base] / 3) * np.sin(2 * np.pi * 0.3 * t)
    return np.clip(out, lo, hi)


def _time_steps(filt: Any, emb: Any, targets: np.ndarray) -> tuple[np.ndarray, int]:
    filt.reset(emb.home)
    costs = np.empty(len(targets))
    clock = time.perf_counter_ns
    for i, target in enumerate(targets):
        t0 = clock()
        filt.step(target)
        costs[i] = clock() - t0
    c = filt.counters
    return costs * 1e-3, int(c.workspace + c.separation)


def bench_filter(seconds: float = 40.0, embodiments: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per embodiment (default: every shipped one) and stream: inner and guarded per-step cost in
    microseconds, and refusals."""
    embodiments = embodiments if embodiments is not None else shipped_embodiments()
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for name in embodiments:
        emb = load_embodiment(name)
        dt = 1.0 / emb.control_rate_hz
        for kind in ("slow", "fast"):
            targets = _targets(emb, kind, seconds, rng)
            inner, _ = _time_steps(build_group_filter(emb, dt), emb, targets)
            guarded, refused = _time_steps(build_filter(emb, dt), emb, targets)
            results[f"{name}/{kind}"] = {
                "rate_hz": emb.control_rate_hz, "ticks": len(targets), "guarded": emb.kinematics is not None,
                "inner_us": {"p50": float(np.median(inner)), "p99": float(np.percentile(inner, 99))},
                "guarded_us": {"p50": float(np.median(guarded)), "p99": float(np.percentile(guarded, 99))},
                "refused": refused, "tick_share_p50": float(np.median(guarded)) * 1e-6 / dt}
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'embodiment/stream':<22} {'Hz':>5} {'ticks':>6}  {'inner p50':>9} {'p99':>7}  {'guarded p50':>11} "
          f"{'p99':>7}  {'% of tick':>9} {'refused':>8}   (us)")
    for key, r in results.items():
        print(f"{key:<22} {r['rate_hz']:>5.0f} {r['ticks']:>6}  {r['inner_us']['p50']:>9.1f} {r['inner_us']['p99']:>7.1f}  "
              f"{r['guarded_us']['p50']:>11.1f} {r['guarded_us']['p99']:>7.1f}  {100 * r['tick_share_p50']:>8.2f}% "
              f"{r['refused']:>8}")
