"""Teleop's sources, pure parts: terminal key parsing, key -> joint steps, gamepad axes -> joint
velocities, the clamped integration, the leader read from a state message; and the evdev adapter
fed with real evdev events (no device: this host has none)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from armada.runtime.teleop.session import MAX_FOLLOW_RATE_HZ, follow_rate_hz
from armada.runtime.teleop.sources import (
    MAX_INTEGRATION_DT_S,
    Bounds,
    GamepadMapping,
    JointJog,
    KeyboardJog,
    KeyboardSource,
    LeaderSource,
    key_tokens,
    leader_from_state,
    normalise_axis,
)

LOWER = np.array([-1.0, -2.0, 0.0])
UPPER = np.array([1.0, 2.0, 0.08])


class FakeFeed:
    """A StateFeed stand-in: the newest state message, set by the test."""

    def __init__(self, msg=None):
        self.msg = msg

    def latest(self):
        return self.msg, 0.0 if self.msg is not None else float("inf")


def state(measured, commanded=None, **device):
    return {"measured": list(measured), "commanded": list(commanded if commanded is not None else measured),
            "device": device}


BOUNDS = Bounds(LOWER, UPPER, np.array([1.0, 1.0, 0.1]), ["a", "b", "grip"], max_engage_distance=0.2)


# --------------------------------------------------------------------------- keys


def test_key_tokens_turn_arrow_escapes_into_names_and_skip_unknown_sequences():
    assert key_tokens("1\x1b[A\x1b[B+x") == ["1", "up", "down", "+", "x"]
    assert key_tokens("\x1bOC\x1bOD") == ["right", "left"]
    assert key_tokens("\x1b[15~a") == ["a"]  # F5: dropped whole, not read as '[', '1', '5', '~'
    assert key_tokens("\x1b") == ["esc"]


def test_keyboard_jog_selects_joints_and_steps_the_selected_one_within_the_limits():
    jog = JointJog(np.zeros(3), LOWER, UPPER, lead=10.0)
    keys = KeyboardJog(dof=3, step=0.5)
    assert keys.on_key("2", jog) == "joint 2 selected"
    keys.on_key("up", jog)
    keys.on_key("+", jog)
    assert jog.target.tolist() == [0.0, 1.0, 0.0]
    keys.on_key("0", jog)  # the last joint (the gripper)
    keys.on_key("down", jog)
    assert jog.target[2] == 0.0  # clamped at its lower limit
    assert keys.on_key("7", jog) == "no joint 7: this arm has 3"
    assert keys.joint == 2
    keys.on_key("]", jog)
    assert keys.step == 0.2  # doubled, capped at max_step
    keys.on_key("[", jog)
    assert keys.step == 0.1
    assert keys.on_key("q", jog) is None  # not a jog key: the CLI's


def test_joint_jog_keeps_the_target_near_the_commanded_pose_and_caps_integration_time():
    jog = JointJog(np.zeros(3), LOWER, UPPER, lead=0.1)
    for _ in range(10):
        jog.step(0, 0.05)
    jog.keep_near(np.zeros(3))
    assert jog.target[0] == pytest.approx(0.1)  # never further ahead than the lead: the driver would refuse it
    jog = JointJog(np.zeros(3), LOWER, UPPER, lead=10.0)
    jog.integrate(np.array([1.0, 0.0, 0.0]), dt=5.0)  # a stalled caller: no jump
    assert jog.target[0] == pytest.approx(MAX_INTEGRATION_DT_S)


def test_keyboard_source_starts_at_the_measured_pose_and_follows_keys():
    src = KeyboardSource(step=0.05)
    feed = FakeFeed(state([0.3, -0.2, 0.04]))
    src.bind(feed, BOUNDS)
    assert src.pose().tolist() == [0.3, -0.2, 0.04]
    src.on_key("1")
    src.on_key("up")
    assert src.pose() == pytest.approx([0.35, -0.2, 0.04])


def test_keyboard_source_without_state_has_no_pose_and_says_why():
    src = KeyboardSource()
    t = time.monotonic()
    src.bind(FakeFeed(None), BOUNDS)
    assert time.monotonic() - t < 2.0
    assert src.pose() is None and "no state" in src.reason


# --------------------------------------------------------------------------- gamepad


def test_gamepad_mapping_dead_zone_signs_banks_and_triggers():
    m = GamepadMapping(dof=7, max_velocity=np.full(7, 2.0), speed_fraction=0.5, deadzone=0.1)
    assert not m.velocity({"ABS_X": 0.05, "ABS_Y": -0.08}).any()  # at rest: no drift
    v = m.velocity({"ABS_X": 1.0, "ABS_Y": 1.0, "ABS_RX": -1.0})
    assert v[:4].tolist() == [1.0, -1.0, -1.0, 0.0]  # full deflection = half the limit; Y is inverted (up = +)
    assert m.velocity({"ABS_X": 0.55})[0] == pytest.approx((0.45 / 0.9) * 0.5 * 2.0)  # rescaled past the dead zone
    assert m.on_button("BTN_TR", True) == "sticks drive joints 5-6"
    v = m.velocity({"ABS_X": 1.0, "ABS_Y": 1.0, "ABS_RX": 1.0})
    assert v.tolist() == [0, 0, 0, 0, 1.0, -1.0, 0]  # bank 2: joints 5-6; the third stick axis has no joint
    assert m.on_button("BTN_TR", False) is None  # releases do nothing
    m.on_button("BTN_TR", True)
    assert m.bank == 0  # wraps
    v = m.velocity({"ABS_RZ": 1.0, "ABS_Z": 0.0})
    assert v[6] == 1.0 and not v[:6].any()  # right trigger opens the gripper


def test_normalise_axis_maps_sticks_and_triggers():
    assert normalise_axis(-32768, -32768, 32767, centred=True) == -1.0
    assert normalise_axis(32767, -32768, 32767, centred=True) == 1.0
    assert normalise_axis(0, 0, 255, centred=False) == 0.0
    assert normalise_axis(255, 0, 255, centred=False) == 1.0


def test_the_evdev_adapter_turns_real_evdev_events_into_axes_and_banks(monkeypatch):
    evdev = pytest.importorskip("evdev", reason="gamepad jogging needs python-evdev (pip install evdev-binary)")
    from evdev import ecodes

    from armada.runtime.teleop import sources

    monkeypatch.setattr(sources, "find_gamepad", lambda: "/dev/input/event-fake")
    src = sources.GamepadSource(say=lambda s: None)
    src._mapping = GamepadMapping(dof=7, max_velocity=np.full(7, 1.0))
    info = {ecodes.ABS_X: evdev.AbsInfo(0, -32768, 32767, 16, 128, 0),
            ecodes.ABS_RZ: evdev.AbsInfo(0, 0, 255, 0, 0, 0)}
    src._on_event(evdev.InputEvent(0, 0, ecodes.EV_ABS, ecodes.ABS_X, 32767), info, ecodes)
    src._on_event(evdev.InputEvent(0, 0, ecodes.EV_ABS, ecodes.ABS_RZ, 255), info, ecodes)
    src._on_event(evdev.InputEvent(0, 0, ecodes.EV_KEY, ecodes.BTN_TR, 1), info, ecodes)
    assert src._axes == {"ABS_X": 1.0, "ABS_RZ": 1.0}
    assert src._mapping.bank == 1


# --------------------------------------------------------------------------- leader


def test_leader_from_state_says_why_there_is_no_pose():
    assert leader_from_state(None, 3)[1] == "no state from the driver yet"
    assert "publishes no leader" in leader_from_state(state([0, 0, 0]), 3)[1]
    assert leader_from_state(state([0, 0, 0], leader=None, leader_error="bus unplugged"), 3) == (None, "bus unplugged")
    assert "unusable" in leader_from_state(state([0, 0, 0], leader=[0.0, 1.0]), 3)[1]
    assert "unusable" in leader_from_state(state([0, 0, 0], leader=[0.0, float("nan"), 0.0]), 3)[1]
    pose, why = leader_from_state(state([0, 0, 0], leader=[0.1, 0.2, 0.03]), 3)
    assert pose.tolist() == [0.1, 0.2, 0.03] and why == ""


def test_leader_source_reads_the_followers_state_and_flags_hardware_following():
    feed = FakeFeed(state([0, 0, 0], leader=[0.1, 0.2, 0.03]))
    src = LeaderSource()
    assert src.pose() is None  # not bound yet
    src.bind(feed, BOUNDS)
    assert src.pose().tolist() == [0.1, 0.2, 0.03]
    assert not src.follows_in_hardware()
    feed.msg = state([0, 0, 0], leader=None, leader_error="CAN bus silent")
    assert src.pose() is None and src.reason == "CAN bus silent"
    feed.msg = state([0, 0, 0], leader=[0, 0, 0], leader_follows_in_hardware=True)
    assert src.follows_in_hardware()


def test_follow_rate_is_the_control_rate_up_to_the_cap():
    assert follow_rate_hz(30.0) == 30.0
    assert follow_rate_hz(500.0) == MAX_FOLLOW_RATE_HZ


def test_base_mapping_turns_sticks_into_a_bounded_base_velocity_with_a_dead_zone():
    from armada.runtime.teleop.sources import BaseMapping

    m = BaseMapping(np.array([0.5, 0.4, 1.0]), speed_fraction=0.5)
    assert np.array_equal(m.velocity({}), np.zeros(3))
    assert np.array_equal(m.velocity({"ABS_Y": 0.05, "ABS_X": -0.1, "ABS_RX": 0.11}), np.zeros(3))  # at rest
    # Stick up (negative Y on evdev) is forward, stick left is +y, right stick left is a left turn.
    v = m.velocity({"ABS_Y": -1.0, "ABS_X": -1.0, "ABS_RX": -1.0})
    assert np.allclose(v, [0.25, 0.2, 0.5])
    # Any deflection, even beyond the axis range, stays within speed_fraction of the bounds.
    for x in (-7.0, -1.0, -0.5, 0.3, 1.0, 12.0):
        v = m.velocity({"ABS_Y": x, "ABS_X": x, "ABS_RX": x})
        assert np.all(np.abs(v) <= 0.5 * np.array([0.5, 0.4, 1.0]) + 1e-12)
