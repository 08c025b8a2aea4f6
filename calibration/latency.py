"""Camera latency: how long after the scene a frame's ``capture_ns`` stamp is.

A frame shows the scene averaged over its exposure, so the delay measured here runs from the
middle of the exposure to the stamp; that is the number to subtract when aligning frames with
robot state. Two methods:

- cross-correlation: move something the robot also measures (a joint swinging a marker through
  the view), track it in the images, and find the time shift that best aligns the two series;
- step: flash a screen or LED at known host times and find when the image brightness crosses
  halfway (this includes the screen's own latency: prefer an LED driven by the host).

Both need the robot or the light and the camera stamped on one clock (the host wall clock: what
``t_ns`` and ``capture_ns`` carry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_MIN_CONFIDENCE = 0.8


class LatencyError(ValueError):
    """The recordings cannot give a latency; the message says why and what to do."""


@dataclass(frozen=True)
class LatencyEstimate:
    delay_s: float
    confidence: float  # cross-correlation: |peak correlation|; step: fraction of steps used
    method: str
    samples: int  # frames used
    sign: int = 1  # cross-correlation: -1 when the image coordinate moves against the reference
    spread_s: float = 0.0  # step: standard deviation of the per-step delays
    per_step_s: list[float] = field(default_factory=list)


def estimate_delay_xcorr(ref_t: np.ndarray, ref_x: np.ndarray, vis_t: np.ndarray, vis_x: np.ndarray, *,
                         search_s: tuple[float, float] = (0.0, 0.5), step_s: float = 0.001) -> LatencyEstimate:
    """Delay of ``vis`` (e.g. a marker's image x from frames stamped ``vis_t``) behind ``ref``
    (e.g. a joint position from driver state stamped ``ref_t``); times in seconds, one clock.

    For each candidate delay d in ``search_s``, the reference is interpolated at ``vis_t - d``
    (the reference is sampled much faster than frames, so interpolating it loses nothing) and
    correlated with the visual series; the peak is refined by a parabola through its neighbours.
    The units and the sign of the two series need not match.
    """
    ref_t, ref_x = _series(ref_t, ref_x, "reference")
    vis_t, vis_x = _series(vis_t, vis_x, "visual")
    lo, hi = search_s
    if not hi > lo:
        raise LatencyError(f"search window {search_s} is empty")
    # Use the same frames for every candidate so the correlations compare like with like.
    keep = (vis_t - hi >= ref_t[0]) & (vis_t - lo <= ref_t[-1])
    t, x = vis_t[keep], _detrend(vis_t[keep], vis_x[keep])
    if len(t) < 10:
        raise LatencyError(f"only {len(t)} frames overlap the reference recording over the search window; "
                           "record both for longer")
    lags = np.arange(lo, hi + step_s / 2, step_s)
    corr = np.array([_pearson(x, _detrend(t, np.interp(t - d, ref_t, ref_x))) for d in lags])
    k = int(np.argmax(np.abs(corr)))
    if k in (0, len(lags) - 1):
        raise LatencyError(f"the best alignment is at the edge of the search window ({lags[k] * 1000:.0f} ms); "
                           "widen the window")
    delay = lags[k] + step_s * _parabola_peak(np.abs(corr[k - 1:k + 2]))
    return LatencyEstimate(float(delay), float(abs(corr[k])), "cross-correlation", len(t), int(np.sign(corr[k])))


def estimate_delay_steps(step_t: Sequence[float], frame_t: np.ndarray, brightness: np.ndarray, *,
                         max_delay_s: float = 0.5, min_contrast: float = 20.0) -> LatencyEstimate:
    """Delay from brightness steps: ``step_t`` are host times the light was switched (on or off,
    alternating or not); ``brightness`` is the mean image brightness of frames stamped ``frame_t``.

    Per step: the levels before and after are the medians of the frames before the switch and
    of the frames at the end of the window; the crossing of their midpoint is interpolated
    between the two frames that straddle it. The trimmed mean over steps is the delay; with
    30 fps frames, 50 steps give it to about a millisecond.
    """
    frame_t, brightness = _series(frame_t, brightness, "frames")
    steps = np.sort(np.asarray(step_t, np.float64))
    delays = []
    for i, s in enumerate(steps):
        end = min(s + max_delay_s, steps[i + 1] if i + 1 < len(steps) else np.inf)
        d = _step_delay(s, end, frame_t, brightness, min_contrast)
        if d is not None:
            delays.append(d)
    if len(delays) < max(2, len(steps) // 2):
        raise LatencyError(f"only {len(delays)} of {len(steps)} steps were seen clearly (contrast under "
                           f"{min_contrast:g} or no frames around them); make the light change bigger and the "
                           "steps longer than the expected delay")
    d = np.array(delays)
    return LatencyEstimate(_trimmed_mean(d), len(d) / len(steps), "brightness step", len(frame_t),
                           spread_s=float(d.std()), per_step_s=[float(v) for v in d])


def _trimmed_mean(d: np.ndarray, cut: float = 0.1) -> float:
    """Mean of the middle 80 %. Each step's delay is off by where in the frame period the switch
    fell, spread evenly over a frame interval: a mean averages that out better than a median,
    and trimming keeps a misread step from pulling it."""
    d = np.sort(d)
    k = int(len(d) * cut)
    return float(d[k:len(d) - k].mean())


def _step_delay(s: float, end: float, t: np.ndarray, b: np.ndarray, min_contrast: float) -> float | None:
    before = b[(t < s) & (t >= s - 0.25 * (end - s))]
    window = (t >= s) & (t < end)
    if len(before) == 0 or window.sum() < 3:
        return None
    tail = b[window][-max(1, window.sum() // 4):]  # the end of the window: the new level has settled
    lo, hi = float(np.median(before)), float(np.median(tail))
    if abs(hi - lo) < min_contrast:
        return None
    mid, rising = (lo + hi) / 2, hi > lo
    idx = np.flatnonzero(window)
    prev = idx[0] - 1
    for k in idx:
        crossed = b[k] >= mid if rising else b[k] <= mid
        if crossed:
            if prev < 0 or b[k] == b[prev]:
                return float(t[k] - s)
            frac = (mid - b[prev]) / (b[k] - b[prev])
            return float(t[prev] + frac * (t[k] - t[prev]) - s)
        prev = k
    return None


def _series(t: np.ndarray, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    t, x = np.asarray(t, np.float64).reshape(-1), np.asarray(x, np.float64).reshape(-1)
    if t.shape != x.shape:
        raise LatencyError(f"{what}: {len(t)} times but {len(x)} values")
    ok = np.isfinite(t) & np.isfinite(x)  # frames where the marker was not found carry NaN
    t, x = t[ok], x[ok]
    if len(t) < 3:
        raise LatencyError(f"{what}: fewer than 3 valid samples")
    order = np.argsort(t, kind="stable")
    t, x = t[order], x[order]
    if np.any(np.diff(t) <= 0):
        keep = np.concatenate([[True], np.diff(t) > 0])  # duplicate stamps: keep the first
        t, x = t[keep], x[keep]
    return t, x


def _detrend(t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Remove mean and slope: a slow drift would correlate at every shift and flatten the peak."""
    A = np.column_stack([t - t.mean(), np.ones_like(t)])
    coef, *_ = np.linalg.lstsq(A, x, rcond=None)
    return x - A @ coef


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else 0.0


def _parabola_peak(y: np.ndarray) -> float:
    """Offset (in steps, within +-0.5) of the vertex of the parabola through three samples."""
    den = y[0] - 2 * y[1] + y[2]
    return 0.0 if den == 0 else float(np.clip(0.5 * (y[0] - y[2]) / den, -0.5, 0.5))
