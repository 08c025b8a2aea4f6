"""Depth sent with a camera's frames reaches the policy's observation, in metres."""

import time

import numpy as np

from armada.runtime.inference.observation import ObservationBuilder
from armada.runtime.transport import FramePublisher, FrameSubscriber, Publisher, Subscriber


def _wait_build(builder, timeout_s=2.0):
    end = time.monotonic() + timeout_s
    while True:
        try:
            return builder.build()
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


def test_depth_arrives_in_metres_next_to_its_colour_frame(ctx, short_tmp):
    frames_ep, state_ep = f"ipc://{short_tmp}/cam", f"ipc://{short_tmp}/state"
    cam_pub, state_pub = FramePublisher(ctx, frames_ep), Publisher(ctx, state_ep)
    builder = ObservationBuilder({"head": FrameSubscriber(ctx, frames_ep)}, {"arm": Subscriber(ctx, state_ep)},
                                 max_frame_age_s=1.0, max_state_age_s=1.0)
    time.sleep(0.2)  # let the subscribers join
    depth = np.full((4, 6), 800, np.uint16)
    pixels = np.zeros((4, 6, 3), np.uint8)
    state = dict(mono_ns=time.monotonic_ns(), mode="idle", measured=np.zeros(2), requested=np.zeros(2),
                 commanded=np.zeros(2), velocity=np.zeros(2), counters={})
    end = time.monotonic() + 2.0
    obs = None
    while obs is None or "head" not in obs.depth_m:
        assert time.monotonic() < end, "no observation with depth"
        cam_pub.send(pixels, depth=depth.copy(), depth_scale_m=0.001, camera="head", frame_seq=1,
                     capture_ns=time.time_ns())
        state_pub.publish("state", **state)
        obs = _wait_build(builder)
    assert obs.depth_m["head"].shape == (4, 6)
    assert np.allclose(obs.depth_m["head"], 0.8)
