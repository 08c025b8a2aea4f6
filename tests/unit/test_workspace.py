"""The Cartesian guard: workspace box and two-arm separation, property-tested on a small two-arm robot."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("pinocchio")

from armada.drivers.core.filters import build_filter  # noqa: E402
from armada.drivers.core.kinematics import ArmKinematics  # noqa: E402
from armada.drivers.core.safety import SafetyFilter, SafetyLimits  # noqa: E402
from armada.drivers.core.workspace import CartesianGuard, cartesian_guard  # noqa: E402
from armada.runtime.config import EmbodimentConfig  # noqa: E402

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# How far a check point may pass the box (or two arms come inside min_separation): nothing beyond
# rounding. The guard bounds the braking path between its samples (drivers/core/workspace.py); with
# sampled checks alone the property tests found 5.05 mm past a box (a UR3 wrist at full speed) and
# 11 mm inside min_separation (this file's two-arm robot, bang-bang streams).
TOLERANCE = 1e-6
FULL_SPEED_TOLERANCE = TOLERANCE
DT = 0.01
MIN_SEP = 0.12

# Per arm: yaw (z), shoulder pitch (y), elbow pitch (y), wrist pitch (y); a gripper dof between.
ARM_JOINTS = [("j1", -2.5, 2.5, 0.0), ("j2", -1.5, 1.5, -0.2), ("j3", -2.5, 2.5, 0.8), ("j4", -2.0, 2.0, 0.0)]
CHAIN = [
    {"suffix": "j1", "xyz": [0, 0, 0.1], "axis": [0, 0, 1]},
    {"suffix": "j2", "xyz": [0, 0, 0.1], "axis": [0, 1, 0]},
    {"suffix": "j3", "xyz": [0.25, 0, 0], "axis": [0, 1, 0]},
    {"suffix": "j4", "xyz": [0.2, 0, 0], "axis": [0, 1, 0]},
]
TOOL = [0.1, 0, 0]
LEFT_BOX = {"min": [-0.1, -0.05, 0.03], "max": [0.55, 0.8, 0.6]}
RIGHT_BOX = {"min": [-0.1, -0.8, 0.03], "max": [0.55, 0.05, 0.6]}


def two_arm(left_box=LEFT_BOX, right_box=RIGHT_BOX, min_separation: float | None = MIN_SEP) -> EmbodimentConfig:
    groups, arms = [], []
    for side, y in (("left", 0.3), ("right", -0.3)):
        groups.append({"name": f"{side}_arm", "joints": [
            {"name": f"{side}_{n}", "min": lo, "max": hi, "max_velocity": 1.5, "max_acceleration": 5.0,
             "home": home} for n, lo, hi, home in ARM_JOINTS]})
        groups.append({"name": f"{side}_gripper", "mode": "gripper_position", "joints": [
            {"name": f"{side}_gripper", "min": 0.0, "max": 0.08, "max_velocity": 0.1,
             "max_acceleration": 1.0, "home": 0.04}]})
        arms.append({"name": side, "source": "a test chain", "base_xyz": [0, y, 0],
                     "chain": [{"joint": f"{side}_{c['suffix']}", "xyz": c["xyz"], "axis": c["axis"]}
                               for c in CHAIN],
                     "tool_xyz": TOOL,
                     "workspace": left_box if side == "left" else right_box})
    kin = {"arms": arms}
    if min_separation is not None:
        kin["min_separation"] = min_separation
    return EmbodimentConfig.model_validate({"name": "two_arm_test", "control_rate_hz": 1 / DT,
                                            "groups": groups, "kinematics": kin})


EMB = two_arm()
HUGE = {"min": [-5, -5, -5], "max": [5, 5, 5]}
KIN = ArmKinematics(EMB)
LIMITS = SafetyLimits.from_embodiment(EMB)


def guard(emb: EmbodimentConfig = EMB) -> CartesianGuard:
    g = cartesian_guard(emb, SafetyFilter(SafetyLimits.from_embodiment(emb), DT))
    assert isinstance(g, CartesianGuard)
    return g


def outside(points: np.ndarray, box: dict) -> float:
    gap = np.maximum(np.maximum(np.array(box["min"]) - points, points - np.array(box["max"])), 0.0)
    return float(np.sqrt((gap * gap).sum(axis=-1)).max())


def separation(points: np.ndarray) -> float:
    d = points[0][:, None, :] - points[1][None, :, :]
    return float(np.sqrt((d * d).sum(axis=-1)).min())


# --------------------------------------------------------------------------- forward kinematics


def test_fk_of_the_test_chain_matches_the_hand_computed_pose() -> None:
    q = EMB.home.copy()
    names = EMB.joint_names
    for side, y in (("left", 0.3), ("right", -0.3)):
        yaw, s, e, w = (q[names.index(f"{side}_{n}")] for n, *_ in ARM_JOINTS)
        # Planar in the arm's vertical plane: pitch about +y turns +x toward -z.
        r = 0.25 * math.cos(s) + 0.2 * math.cos(s + e)
        z = 0.2 - 0.25 * math.sin(s) - 0.2 * math.sin(s + e)
        wrist = np.array([r * math.cos(yaw), y + r * math.sin(yaw), z])
        r_t = r + 0.1 * math.cos(s + e + w)
        tool = np.array([r_t * math.cos(yaw), y + r_t * math.sin(yaw), z - 0.1 * math.sin(s + e + w)])
        pts = KIN.points(q)[0 if side == "left" else 1]
        np.testing.assert_allclose(pts[0], wrist, atol=1e-12)
        np.testing.assert_allclose(pts[1], tool, atol=1e-12)


def test_fk_yaw_rotates_the_points_about_the_base() -> None:
    q = EMB.home.copy()
    base = np.array([0.0, 0.3, 0.0])
    before = KIN.points(q)[0]
    q[EMB.joint_names.index("left_j1")] = math.pi / 2
    after = KIN.points(q)[0]
    rel = before - base
    np.testing.assert_allclose(after - base, np.stack([-rel[:, 1], rel[:, 0], rel[:, 2]], axis=1), atol=1e-12)
    # The right arm did not move.
    np.testing.assert_allclose(KIN.points(q)[1], KIN.points(EMB.home)[1])


def test_fk_prismatic_negative_axis_and_base_rpy() -> None:
    emb = EmbodimentConfig.model_validate({
        "name": "lift_test", "control_rate_hz": 100,
        "groups": [{"name": "lift", "mode": "lift_height", "joints": [
                        {"name": "lift", "min": 0.0, "max": 0.4, "max_velocity": 0.1, "max_acceleration": 0.5}]},
                   {"name": "arm", "joints": [
                        {"name": "a1", "min": -3, "max": 3, "max_velocity": 1, "max_acceleration": 1}]}],
        "kinematics": {"arms": [{
            "name": "arm", "source": "test", "base_xyz": [1, 2, 3], "base_rpy": [0, 0, math.pi / 2],
            "chain": [{"joint": "lift", "type": "prismatic", "axis": [0, 0, 1]},
                      {"joint": "a1", "xyz": [0.5, 0, 0], "axis": [0, 0, -1]}],
            "tool_xyz": [0.2, 0, 0]}]}})
    kin = ArmKinematics(emb)
    pts = kin.points(np.array([0.3, math.pi / 2]))[0]
    # Base yawed 90 deg: its x is the robot's y. The wrist is 0.5 along it, 0.3 up the lift.
    np.testing.assert_allclose(pts[0], [1.0, 2.5, 3.3], atol=1e-12)
    # a1 turns -90 deg about the base's z: the tool's +x (robot +y) turns to robot +x.
    np.testing.assert_allclose(pts[1], [1.2, 2.5, 3.3], atol=1e-12)


def test_missing_pinocchio_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pinocchio", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[kinematics\]'"):
        ArmKinematics(EMB)


def test_build_filter_wraps_only_embodiments_with_kinematics() -> None:
    assert isinstance(build_filter(EMB, DT), CartesianGuard)
    plain = EMB.model_copy(update={"kinematics": None})
    assert not isinstance(build_filter(plain, DT), CartesianGuard)


# --------------------------------------------------------------------------- the guard


def test_home_is_inside_both_boxes_and_apart() -> None:
    pts = KIN.points(EMB.home)
    assert outside(pts[0], LEFT_BOX) == 0.0 and outside(pts[1], RIGHT_BOX) == 0.0
    assert separation(pts) > MIN_SEP


def test_reaching_out_of_the_box_stops_at_its_face() -> None:
    g = guard()
    g.reset(EMB.home)
    target = EMB.home.copy()
    target[EMB.joint_names.index("left_j2")] = 1.2  # shoulder down: the tool goes through the table
    for _ in range(300):
        g.step(target)
    assert g.counters.workspace > 0
    pts = KIN.points(g.position)
    assert outside(pts[0], LEFT_BOX) <= TOLERANCE
    assert not np.any(g.velocity)  # braked to rest against the face, not oscillating
    # Pulling back out of the face is followed at once.
    before = g.counters.workspace
    for _ in range(200):
        g.step(EMB.home)
    assert g.counters.workspace == before
    np.testing.assert_allclose(g.position, EMB.home, atol=1e-9)


def test_an_arm_started_outside_may_move_back_in_but_not_further_out() -> None:
    g = guard(two_arm(min_separation=None))
    start = EMB.home.copy()
    start[EMB.joint_names.index("left_j1")] = -1.4  # yawed across the middle, into the right arm's side
    assert outside(KIN.points(start)[0], LEFT_BOX) > 0.05
    g.reset(start)
    further = start.copy()
    further[EMB.joint_names.index("left_j1")] = -1.7
    for _ in range(50):
        g.step(further)
    assert g.counters.workspace > 0
    assert outside(KIN.points(g.position)[0], LEFT_BOX) <= outside(KIN.points(start)[0], LEFT_BOX) + 1e-9
    # Back home: never further out on the way, and it arrives (near the box face the guard's
    # margin at speed may slow it: the bound on its braking path must stay inside once it is in).
    worst = outside(KIN.points(g.position)[0], LEFT_BOX)
    for _ in range(300):
        g.step(EMB.home)
        out = outside(KIN.points(g.position)[0], LEFT_BOX)
        assert out <= worst + 1e-9
        worst = out
    np.testing.assert_allclose(g.position, EMB.home, atol=1e-9)


def test_arms_reaching_toward_each_other_stop_apart() -> None:
    g = guard()
    g.reset(EMB.home)
    target = EMB.home.copy()
    # Both arms yaw toward the middle (y = 0): their tools would meet.
    target[EMB.joint_names.index("left_j1")] = -1.2
    target[EMB.joint_names.index("right_j1")] = 1.2
    for _ in range(300):
        g.step(target)
    assert g.counters.separation > 0
    assert separation(KIN.points(g.position)) >= MIN_SEP - TOLERANCE


def test_snapshot_restore_round_trip() -> None:
    g = guard()
    g.reset(EMB.home)
    g.step(EMB.home + 0.05)
    snap = g.snapshot()
    a = [g.step(EMB.home + 0.1) for _ in range(5)]
    g.restore(snap)
    b = [g.step(EMB.home + 0.1) for _ in range(5)]
    np.testing.assert_array_equal(np.array(a), np.array(b))


# --------------------------------------------------------------------------- properties

JOINT_LO, JOINT_HI = EMB.lower, EMB.upper


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[np.ndarray | None, int]]:
    """Targets (anywhere in and a bit beyond the joint ranges; some None or NaN), each held some ticks."""
    out = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["target", "target", "target", "none", "nan"]))
        ticks = draw(st.integers(1, 60))
        if kind == "none":
            out.append((None, ticks))
            continue
        fr = np.array(draw(st.lists(st.floats(-0.2, 1.2), min_size=EMB.dof, max_size=EMB.dof)))
        target = JOINT_LO + fr * (JOINT_HI - JOINT_LO)
        if kind == "nan":
            target[draw(st.integers(0, EMB.dof - 1))] = math.nan
        out.append((target, ticks))
    return out


@PROPERTY
@given(stream=streams())
def test_check_points_never_cross_the_box_nor_come_too_close(stream) -> None:
    g = guard()
    g.reset(EMB.home)
    worst_out, worst_sep = 0.0, math.inf
    for target, ticks in stream:
        for _ in range(ticks):
            g.step(target)
            pts = KIN.points(g.position)
            worst_out = max(worst_out, outside(pts[0], LEFT_BOX), outside(pts[1], RIGHT_BOX))
            worst_sep = min(worst_sep, separation(pts))
    assert worst_out <= TOLERANCE
    assert worst_sep >= MIN_SEP - TOLERANCE


@PROPERTY
@given(stream=streams())
def test_a_stream_that_stays_inside_is_unchanged(stream) -> None:
    # Boxes holding everything the arms can reach, no separation limit: the guard never refuses,
    # and its output is the inner filter's, bit for bit.
    g = guard(two_arm(HUGE, HUGE, None))
    bare = SafetyFilter(LIMITS, DT)
    g.reset(EMB.home)
    bare.reset(EMB.home)
    for target, ticks in stream:
        for _ in range(ticks):
            np.testing.assert_array_equal(g.step(target), bare.step(target))
    assert g.counters.workspace == 0 and g.counters.separation == 0
    assert g.counters.as_dict() == bare.counters.as_dict()


def test_a_table_top_motion_inside_the_real_boxes_is_unchanged() -> None:
    g = guard()
    bare = SafetyFilter(LIMITS, DT)
    g.reset(EMB.home)
    bare.reset(EMB.home)
    t = np.arange(400) * DT
    for k in range(t.size):
        target = EMB.home + 0.25 * np.sin(2 * math.pi * 0.5 * t[k]) * np.array([1, -0.4, 0.3, -0.3, 0, -1, -0.4, 0.3, -0.3, 0])
        np.testing.assert_array_equal(g.step(target), bare.step(target))
    assert g.counters.workspace == 0 and g.counters.separation == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(["ur3", "aloha"]))
def test_real_embodiments_stay_inside_their_boxes_at_full_speed(seed: int, name: str) -> None:
    # UR3: pi and 2 pi rad/s with 8 and 15 rad/s^2, over a second of braking travel on the wrists,
    # where the braking path's curvature matters most; ALOHA: two arms and their separation.
    from armada.runtime.config import load_embodiment

    emb = load_embodiment(name)
    g = build_filter(emb, 1.0 / emb.control_rate_hz)
    kin = ArmKinematics(emb)
    boxes = [{"min": a.workspace.min, "max": a.workspace.max} for a in emb.kinematics.arms]
    rng = np.random.default_rng(seed)
    g.reset(emb.home)
    for _ in range(4):
        target = rng.uniform(emb.lower, emb.upper)
        for _ in range(int(emb.control_rate_hz)):
            g.step(target)
            pts = kin.points(g.position)
            assert max(outside(p, b) for p, b in zip(pts, boxes)) <= FULL_SPEED_TOLERANCE
            if emb.kinematics.min_separation:
                assert separation(pts) >= emb.kinematics.min_separation - FULL_SPEED_TOLERANCE
