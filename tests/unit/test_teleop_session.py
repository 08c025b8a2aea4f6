"""TeleopSession without a driver: the blend-in toward a moving source (bounded speed and
acceleration, then exact tracking), who may arm, and a clear error when no driver answers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from armada.runtime.config import CONFIG_DIR, load_cell
from armada.runtime.teleop.session import TeleopError, TeleopSession
from armada.runtime.teleop.sources import LeaderSource


@pytest.fixture
def mock_session(short_tmp):
    s = TeleopSession(load_cell(CONFIG_DIR / "cells" / "teleop_mock.yaml", short_tmp), None, LeaderSource(),
                      say=lambda line: None)
    yield s
    s.close()


def test_blend_in_approaches_a_moving_source_within_its_limits_then_tracks_it_exactly(mock_session):
    s = mock_session
    dt = 1.0 / s.rate_hz
    home = s.emb.home
    s._sent, s._blending, s._blend_v, s._prev_source = home.copy(), True, np.zeros(s.emb.dof), None
    sent = [home.copy()]
    targets, blending = [], []
    for k in range(400):
        target = home + 0.5 + 0.2 * np.sin(2 * np.pi * 0.25 * k * dt)  # 0.5 away and moving
        target[-1] = home[-1] + 0.02
        out = s._blend(target)
        blending.append(s._blending)
        s._sent = out
        sent.append(out)
        targets.append(target)
    q = np.stack(sent)
    v = np.diff(q, axis=0) / dt
    assert np.all(np.abs(v) <= s._blend_velocity * (1 + 1e-9)), (np.abs(v) / s._blend_velocity).max()
    a = np.diff(v, axis=0) / dt
    during = [i for i in range(len(a)) if blending[i + 1]]  # both periods still blending
    # A joint that arrives snaps onto its target: at most a little over one period's braking.
    ratio = np.abs(a[during]) / s._blend_acceleration
    assert ratio.max() <= 1.2, (ratio.max(), np.unravel_index(np.argmax(ratio), ratio.shape), len(during))
    assert not s._blending, "never caught up with a source slower than the blend speed"
    assert np.array_equal(q[-1], targets[-1])  # tracking exactly once caught up


def test_arming_is_allowed_on_a_mock_cell_and_not_on_real_hardware_without_arm(mock_session, short_tmp):
    assert mock_session.allow_arm
    cell = load_cell(CONFIG_DIR / "cells" / "teleop_so101_fake.yaml", short_tmp)
    for arm, allowed in ((False, False), (True, True)):
        s = TeleopSession(cell, None, LeaderSource(), say=lambda line: None, arm=arm)
        try:
            assert s.allow_arm is allowed
        finally:
            s.close()


def test_engage_without_a_driver_says_so_in_time(mock_session):
    t = time.monotonic()
    with pytest.raises(TeleopError, match="does not answer .* is it running"):
        mock_session.engage(lambda q: True)
    assert time.monotonic() - t < 3.0
    assert mock_session.lease is None


def test_a_source_running_ahead_is_held_within_reach_and_a_jumping_one_is_refused(mock_session):
    s = mock_session
    home = s.emb.home
    far = home + np.array([1.0, -0.05, 0, 0, 0, 0, 0])
    out = s._keep_within_reach(far, {"commanded": home})
    reach = 0.5 * s.emb.max_engage_distance
    assert out[0] == pytest.approx(home[0] + reach) and out[1] == pytest.approx(home[1] - 0.05)
    assert s.stats.reach_limited == 1
    s._last_source = None
    assert s._source_jump(home) is None  # the first pose: nothing to compare with
    assert s._source_jump(home + 0.01) is None  # moved: followed
    assert s._source_jump(home + 0.01) is None  # stood still: followed, not lost
    why = s._source_jump(home + np.array([0, 0, 0.5, 0, 0, 0, 0]))
    assert why is not None and "jumped 0.490 at joint elbow" in why
