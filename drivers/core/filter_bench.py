"""`armada bench filter`: what the driver's filter costs per tick, per embodiment, with and without
the Cartesian guard (workspace box, separation), on a slow and a fast target stream.

- slow: a 0.3 Hz sine over a tenth of each position joint's range around home (nothing refused);
- fast: a new random target in the range every second (full speed: many steps refused by the guard).
  With the guard, also the worst any check point got outside its box and the closest two arms came.
A base's velocity entries get a slow sine within a third of their bounds in both streams.
Pure computation: no processes, no sockets; the numbers are the filter's own.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from armada.drivers.core.filters import build_filter
from armada.drivers.core.kinematics import ArmKinematics
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


def _time_steps(filt: Any, emb: Any, targets: np.ndarray, excursions: bool = False) -> tuple[np.ndarray, int, dict]:
    """Per-step cost (us), refusals, and with ``excursions`` the worst any check point got outside
    its box and the closest two arms came (m; measured after each step, outside the timing)."""
    filt.reset(emb.home)
    costs = np.empty(len(targets))
    clock = time.perf_counter_ns
    kin = ArmKinematics(emb) if excursions and emb.kinematics is not None else None
    worst, closest = 0.0, float("inf")
    for i, target in enumerate(targets):
        t0 = clock()
        filt.step(target)
        costs[i] = clock() - t0
        if kin is not None:
            out, sep = _excursion(kin, emb, filt.position)
            worst, closest = max(worst, out), min(closest, sep)
    c = filt.counters
    seen = {"worst_outside_m": worst, "closest_m": closest if closest < float("inf") else None}
    return costs * 1e-3, int(c.workspace + c.separation), seen


def _excursion(kin: ArmKinematics, emb: Any, position: np.ndarray) -> tuple[float, float]:
    pts = kin.points(position)
    worst, closest = 0.0, float("inf")
    for a, arm in enumerate(emb.kinematics.arms):
        if arm.workspace is not None:
            gap = np.maximum(np.maximum(np.array(arm.workspace.min) - pts[a], pts[a] - np.array(arm.workspace.max)), 0.0)
            worst = max(worst, float(np.sqrt((gap * gap).sum(axis=-1)).max()))
    if emb.kinematics.min_separation is not None:
        for a in range(len(pts)):
            for b in range(a + 1, len(pts)):
                d = pts[a][:, None, :] - pts[b][None, :, :]
                closest = min(closest, float(np.sqrt((d * d).sum(axis=-1)).min()))
    return worst, closest


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
            inner, _, _ = _time_steps(build_group_filter(emb, dt), emb, targets)
            guarded, refused, seen = _time_steps(build_filter(emb, dt), emb, targets, excursions=True)
            results[f"{name}/{kind}"] = {
                "rate_hz": emb.control_rate_hz, "ticks": len(targets), "guarded": emb.kinematics is not None,
                "inner_us": {"p50": float(np.median(inner)), "p99": float(np.percentile(inner, 99))},
                "guarded_us": {"p50": float(np.median(guarded)), "p99": float(np.percentile(guarded, 99))},
                "refused": refused, "tick_share_p50": float(np.median(guarded)) * 1e-6 / dt,
                "min_separation_m": emb.kinematics.min_separation if emb.kinematics is not None else None, **seen}
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'embodiment/stream':<22} {'Hz':>5} {'ticks':>6}  {'inner p50':>9} {'p99':>7}  {'guarded p50':>11} "
          f"{'p99':>7}  {'% of tick':>9} {'refused':>8}   (us)   worst outside box   closest arms (min)")
    for key, r in results.items():
        out = f"{r['worst_outside_m'] * 1e3:.3f} mm" if r["guarded"] else "-"
        sep = (f"{r['closest_m'] * 1e3:.1f} mm ({r['min_separation_m'] * 1e3:.0f})"
               if r.get("closest_m") is not None and r.get("min_separation_m") else "-")
        print(f"{key:<22} {r['rate_hz']:>5.0f} {r['ticks']:>6}  {r['inner_us']['p50']:>9.1f} {r['inner_us']['p99']:>7.1f}  "
              f"{r['guarded_us']['p50']:>11.1f} {r['guarded_us']['p99']:>7.1f}  {100 * r['tick_share_p50']:>8.2f}% "
              f"{r['refused']:>8}          {out:>12}   {sep}")
