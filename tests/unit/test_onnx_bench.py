"""The helpers `armada bench model` uses to report ONNX parity (runtime.model.bench_model): the gap
between two chunks in normalized action units, and the invisible input change that gives the
eager model's own noise floor."""

from __future__ import annotations

import time

import numpy as np
import pytest

from armada.runtime.inference.observation import Observation
from armada.runtime.model.bench_model import _normalized_gap, _one_gray_level_off
from armada.runtime.model.bundle import NormStats


def test_gap_is_measured_in_normalized_units() -> None:
    stats = NormStats(kind="quantile", q01=[-1.0, 0.0, 5.0], q99=[1.0, 4.0, 5.5], mask=[True, True, False])
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (8, 3))
    b = a + np.array([0.01, -0.02, 0.03])
    # unnormalized, dimension 1 spans 4 units and dimension 2 passes through: the gaps must come back
    gap = _normalized_gap(stats, stats.unnormalize(a), stats.unnormalize(b))
    assert gap == pytest.approx(0.03, abs=1e-9)
    b2 = a + np.array([0.0, -0.05, 0.0])
    assert _normalized_gap(stats, stats.unnormalize(a), stats.unnormalize(b2)) == pytest.approx(0.05, abs=1e-9)
    assert _normalized_gap(stats, stats.unnormalize(a), stats.unnormalize(a)) == 0.0


def test_one_gray_level_off_changes_one_camera_by_one_level() -> None:
    rng = np.random.default_rng(1)
    frames = {c: rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for c in ("wrist", "front")}
    obs = Observation(time.monotonic_ns(), time.time_ns(), np.zeros(7), frames)
    nudged = _one_gray_level_off(obs)
    changed = nudged.frames["front"].astype(int) - frames["front"].astype(int)  # "front" sorts first
    assert np.all(np.abs(changed) == 1)
    assert nudged.frames["front"].dtype == np.uint8
    np.testing.assert_array_equal(nudged.frames["wrist"], frames["wrist"])
    assert obs.frames["front"] is frames["front"]  # the original observation is left as it was
