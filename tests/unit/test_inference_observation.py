"""Observation ages on our own clock, and streams checked for kind and shape."""

from __future__ import annotations

import time

import numpy as np
import pytest

from armada.runtime.inference.observation import ObservationBuilder, StaleObservation
from armada.runtime.transport import FramePublisher, FrameSubscriber, Publisher, Subscriber

SHAPE = (4, 6, 3)


@pytest.fixture
def streams(ctx, short_tmp):
    frames_ep, state_ep = f"ipc://{short_tmp}/cam", f"ipc://{short_tmp}/state"
    cam, state = FramePublisher(ctx, frames_ep), Publisher(ctx, state_ep)
    builder = ObservationBuilder({"head": FrameSubscriber(ctx, frames_ep)}, {"arm": Subscriber(ctx, state_ep)},
                                 max_frame_age_s=0.2, max_state_age_s=0.2, frame_shapes={"head": SHAPE},
                                 state_dof={"arm": 2})
    time.sleep(0.2)  # let the subscribers join
    yield cam, state, builder


def _state(**over) -> dict:
    q = np.zeros(2)
    return dict(mono_ns=time.monotonic_ns(), mode="armed", measured=q, requested=q, commanded=q, velocity=q,
                counters={}) | over


def _send(cam, state, capture_ns: int, shape=SHAPE) -> None:
    cam.send(np.zeros(shape, np.uint8), camera="head", frame_seq=1, capture_ns=capture_ns)
    state.publish("state", **_state())


def _build_soon(builder, timeout_s: float = 1.0):
    end = time.monotonic() + timeout_s
    while True:
        try:
            return builder.build()
        except StaleObservation:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def test_a_camera_stamping_ten_seconds_ahead_cannot_hide_that_it_died(streams):
    cam, state, builder = streams
    _send(cam, state, time.time_ns() + 10_000_000_000)  # its clock runs 10 s ahead
    obs = _build_soon(builder)
    assert 0.0 <= obs.frame_age_s["head"] < 0.2  # aged by its arrival here, not by its stamp
    assert builder.counters["head"].future_stamps == 1  # flagged
    died = time.monotonic()  # the camera sends nothing more; the driver goes on
    while time.monotonic() - died < 0.5:
        state.publish("state", **_state())
        time.sleep(0.01)
        builder.poll()
    with pytest.raises(StaleObservation, match="camera head frame is"):
        builder.build()


def test_a_sender_stamp_can_only_make_an_age_larger(streams):
    cam, state, builder = streams
    _send(cam, state, time.time_ns() - 1_000_000_000)  # it arrives now, but was taken a second ago
    time.sleep(0.1)
    builder.poll()
    with pytest.raises(StaleObservation, match="camera head frame is 1[0-9]{3} ms old"):
        builder.build()


def test_frames_of_another_size_and_messages_of_another_kind_are_counted_and_ignored(streams):
    cam, state, builder = streams
    for _ in range(3):
        cam.send(np.zeros((8, 6, 3), np.uint8), camera="head", frame_seq=1, capture_ns=time.time_ns())
        state.publish("event", event="not a state")
        state.publish("state", **_state(measured=np.zeros(5)))
        state.publish("state", **_state(commanded=np.array([0.0, np.nan])))
        time.sleep(0.02)
    time.sleep(0.05)
    with pytest.raises(StaleObservation) as stale:
        builder.build()
    assert "no frame yet from camera head (3 ignored, the last: camera head sent a (8, 6, 3) uint8 frame, " \
           "expected (4, 6, 3) uint8" in str(stale.value)
    assert "no state yet from driver arm (9 ignored" in str(stale.value)
    assert builder.counters["head"].rejected == 3
    assert builder.counters["arm"].rejected == 9
    _send(cam, state, time.time_ns())  # the right ones still get through
    obs = _build_soon(builder)
    assert obs.frames["head"].shape == SHAPE and obs.state.shape == (2,)
