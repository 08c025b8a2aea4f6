"""Clock offsets of other hosts' streams (runtime/remote/clock.py) and their use in message ages."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from armada.runtime.inference.observation import Arrival, ObservationBuilder
from armada.runtime.remote.clock import endpoint_host, stream_offsets, wall_offset_ns


def test_endpoint_host():
    assert endpoint_host("tcp://10.0.0.2:5555") == "10.0.0.2"
    assert endpoint_host("ipc:///run/armada/x") is None


def test_wall_offset_from_the_mono_offset_and_one_states_two_stamps():
    # Their monotonic runs 100 s ahead of ours; their wall is 2.5 s behind ours.
    our_wall, our_mono = 1_700_000_000 * 10**9, 50 * 10**9
    their_mono = our_mono + 100 * 10**9
    their_wall = our_wall - 2_500_000_000
    state = {"t_ns": their_wall, "mono_ns": their_mono}
    assert wall_offset_ns(100 * 10**9, state, our_wall, our_mono) == -2_500_000_000


class _Sub:
    def __init__(self, endpoint: str):
        self.socket = SimpleNamespace(getsockopt_string=lambda opt: endpoint)


def _link(cmd: str, offset_ns: int):
    return SimpleNamespace(cfg=SimpleNamespace(cmd=cmd), offset_ns=offset_ns)


def test_cameras_on_a_drivers_host_get_its_offset_others_none():
    now_wall, now_mono = time.time_ns(), time.monotonic_ns()
    behind = 3_000_000_000  # the robot host's wall clock runs 3 s behind ours
    links = {"arm": _link("tcp://10.0.0.2:6001", 0)}
    states = {"arm": {"t_ns": now_wall - behind, "mono_ns": now_mono}}
    cams = {"front": _Sub("tcp://10.0.0.2:6010"), "ceiling": _Sub("tcp://10.0.0.9:6010"),
            "local": _Sub("ipc:///tmp/x/cam")}
    offsets = stream_offsets(links, states, cams)
    assert set(offsets) == {"arm", "front"}
    assert offsets["front"] == offsets["arm"] == pytest.approx(-behind, abs=5_000_000)


def test_a_local_driver_and_a_driver_without_state_give_nothing():
    links = {"a": _link("ipc:///tmp/a", 0), "b": _link("tcp://10.0.0.2:1", 0)}
    assert stream_offsets(links, {"a": {"t_ns": 1, "mono_ns": 1}}, {}) == {}


def test_a_frame_from_a_host_whose_clock_is_behind_is_not_stale_once_the_offset_is_known():
    builder = ObservationBuilder({}, {}, max_frame_age_s=0.25, max_state_age_s=0.1)
    now_wall, now_mono = time.time_ns(), time.monotonic_ns()
    behind = 2_000_000_000
    # Captured 30 ms before it arrived (just now), stamped on a wall clock 2 s behind ours.
    arrival = Arrival(msg=None, mono_ns=now_mono, sender_ns=now_wall - 30_000_000 - behind, t_ns=now_wall)
    assert builder.age_s("front", arrival, now_mono) == pytest.approx(2.03, abs=1e-6)  # looks stale
    builder.sender_offset_ns["front"] = -behind
    assert builder.age_s("front", arrival, now_mono) == pytest.approx(0.03, abs=1e-6)
