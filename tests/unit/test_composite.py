"""CompositeBackend: several device backends as one robot (drivers/core/composite.py).

Small fake parts record every call and can be told to fail; the composite must split, combine,
name the failing part, and reach every part with stops even when one of them raises.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.composite import CompositeBackend, Part
from armada.drivers.core.driver import Driver, Mode
from armada.runtime.config import load_embodiment
from armada.runtime.protocol import MessageFactory


class FakePart(Backend):
    """A device with ``n`` values that remembers every call; ``fail[op]`` makes ``op`` raise it."""

    def __init__(self, n: int, start: float = 0.0, velocity: bool = True, mono_ns: int = 1000):
        self.n = n
        self.position = np.arange(n, dtype=float) + start
        self.has_velocity = velocity
        self.mono_ns = mono_ns
        self.estopped = False
        self.fault: str | None = None
        self.extras: dict | None = None
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.written: list[np.ndarray] = []
        self.connected = False

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail:
            raise self.fail[op]

    def connect(self, timeout_s: float) -> None:
        self._maybe_fail("connect")
        self.connected = True

    def read(self) -> Reading:
        self._maybe_fail("read")
        return Reading(position=self.position.copy(), mono_ns=self.mono_ns,
                       velocity=np.zeros(self.n) if self.has_velocity else None, estopped=self.estopped,
                       fault=self.fault, extras=self.extras)

    def write(self, position: np.ndarray) -> None:
        self._maybe_fail("write")
        self.written.append(np.array(position))
        self.position = np.array(position, dtype=float)

    def estop(self) -> None:
        self._maybe_fail("estop")

    def release_estop(self) -> None:
        self._maybe_fail("release_estop")

    def recover(self, timeout_s: float) -> None:
        self._maybe_fail("recover")

    def on_fault(self, reason: str) -> None:
        self._maybe_fail("on_fault")

    def close(self) -> None:
        self._maybe_fail("close")
        self.connected = False


def three_parts(**kw) -> tuple[CompositeBackend, list[FakePart]]:
    """left (0-2), base (3, 5: a list, interleaved), right (4, 6)."""
    fakes = [FakePart(3, 0.0), FakePart(2, 10.0), FakePart(2, 20.0)]
    comp = CompositeBackend([Part("left", slice(0, 3), fakes[0]), Part("base", [3, 5], fakes[1]),
                             Part("right", [4, 6], fakes[2])], **kw)
    return comp, fakes


# ---------------------------------------------------------------------- layout


def test_read_puts_each_part_at_its_indices():
    comp, fakes = three_parts()
    r = comp.read()
    assert comp.dof == 7
    assert r.position.tolist() == [0, 1, 2, 10, 20, 11, 21]
    assert r.velocity is not None and r.velocity.shape == (7,)
    assert not r.estopped and r.fault is None and r.extras is None


def test_write_is_split_by_indices():
    comp, fakes = three_parts()
    comp.write(np.arange(7.0) * 10)
    assert fakes[0].written[-1].tolist() == [0, 10, 20]
    assert fakes[1].written[-1].tolist() == [30, 50]
    assert fakes[2].written[-1].tolist() == [40, 60]


@settings(max_examples=50, deadline=None)
@given(st.permutations(range(6)), st.integers(1, 5), st.lists(st.floats(-1e3, 1e3), min_size=6, max_size=6))
def test_write_then_read_round_trips_for_any_partition(order, cut, values):
    a, b = FakePart(cut), FakePart(6 - cut)
    comp = CompositeBackend([Part("a", list(order[:cut]), a), Part("b", list(order[cut:]), b)])
    comp.write(np.array(values))
    assert comp.read().position.tolist() == values


@pytest.mark.parametrize("parts, match", [
    ([], "at least one part"),
    ([("a", slice(0, 2)), ("a", slice(2, 4))], "distinct"),
    ([("a", slice(0, 2)), ("b", [1, 2])], "'a' and 'b' both claim dofs \\[1\\]"),
    ([("a", slice(0, 2)), ("b", [3])], "dofs \\[2\\] belong to no part"),
    ([("a", [0, 0])], "repeat"),
    ([("a", [])], "no dofs"),
    ([("a", slice(0, None))], "needs a start >= 0, an end"),
    ([("a", [0.5])], "slice or a list of indices"),
])
def test_bad_layouts_are_refused_clearly(parts, match):
    with pytest.raises(ValueError, match=match):
        CompositeBackend([Part(name, dofs, FakePart(1)) for name, dofs in parts])


def test_a_dof_outside_the_robot_is_refused():
    with pytest.raises(ValueError, match="outside the robot's 0..3"):
        CompositeBackend([Part("a", [0, 1, 2, 3, 4], FakePart(5))], dof=4)


def test_bad_write_changes_nothing():
    comp, fakes = three_parts()
    for bad in (np.zeros(6), np.array([0, 0, np.nan, 0, 0, 0, 0.0])):
        with pytest.raises(BackendError, match="7 finite values") as err:
            comp.write(bad)
        assert not err.value.transient
    assert all(not f.written for f in fakes)


# ---------------------------------------------------------------------- read combining


def test_velocity_only_when_every_part_has_it_and_mono_ns_is_the_oldest():
    fakes = [FakePart(2, mono_ns=500), FakePart(1, velocity=False, mono_ns=300), FakePart(1, mono_ns=900)]
    comp = CompositeBackend([Part(n, [i], f) if f.n == 1 else Part(n, [i, i + 1], f)
                             for n, i, f in (("a", 0, fakes[0]), ("b", 2, fakes[1]), ("c", 3, fakes[2]))])
    r = comp.read()
    assert r.velocity is None and r.mono_ns == 300


def test_estop_of_any_part_estops_the_robot():
    comp, fakes = three_parts()
    fakes[1].estopped = True
    assert comp.read().estopped


def test_faults_are_named_by_part():
    comp, fakes = three_parts(name="Robot")
    fakes[2].fault = "motor 2 overheated"
    assert comp.read().fault == "right: motor 2 overheated"
    fakes[0].fault = "CAN error"
    assert comp.read().fault == "left: CAN error; right: motor 2 overheated"


def test_a_part_error_names_the_part_and_keeps_transient():
    comp, fakes = three_parts(name="Robot")
    fakes[1].fail["read"] = BackendError("feedback stale", transient=True)
    with pytest.raises(BackendError) as err:
        comp.read()
    assert err.value.transient and str(err.value) == "Robot base: feedback stale"
    fakes[2].fail["read"] = BackendError("bus off", transient=False)
    with pytest.raises(BackendError) as err:
        comp.read()
    assert not err.value.transient and "Robot base: feedback stale" in str(err.value)
    assert "Robot right: bus off" in str(err.value)


def test_an_sdk_exception_becomes_a_non_transient_error_naming_the_part():
    comp, fakes = three_parts()
    fakes[0].fail["read"] = RuntimeError("CAN socket closed")
    with pytest.raises(BackendError, match="left: RuntimeError: CAN socket closed") as err:
        comp.read()
    assert not err.value.transient


def test_a_part_reading_of_the_wrong_size_is_an_error_naming_it():
    comp, fakes = three_parts()
    fakes[1].position = np.zeros(3)
    with pytest.raises(BackendError, match="base: read \\(3,\\) values, its part of the robot has 2"):
        comp.read()


def test_extras_are_namespaced_by_part_unless_merged():
    comp, fakes = three_parts()
    fakes[0].extras = {"temp": [30.0]}
    fakes[1].extras = {"odometry": [0.0, 0.0, 0.0]}
    assert comp.read().extras == {"left": {"temp": [30.0]}, "base": {"odometry": [0.0, 0.0, 0.0]}}

    class Merged(CompositeBackend):
        def merge_extras(self, readings):
            return {"estopped_parts": [n for n, r in readings.items() if r.estopped]}

    fakes[2].estopped = True
    merged = Merged(comp.parts)
    assert merged.read().extras == {"estopped_parts": ["right"]}


# ---------------------------------------------------------------------- writes and stops


def test_a_failing_part_write_still_writes_the_others_then_raises_naming_it():
    comp, fakes = three_parts()
    fakes[0].fail["write"] = BackendError("refused", transient=False)
    with pytest.raises(BackendError, match="^left: refused$") as err:
        comp.write(np.ones(7))
    assert not err.value.transient
    assert len(fakes[1].written) == 1 and len(fakes[2].written) == 1


def test_write_error_is_transient_only_if_every_failure_was():
    comp, fakes = three_parts()
    fakes[1].fail["write"] = BackendError("busy", transient=True)
    with pytest.raises(BackendError) as err:
        comp.write(np.ones(7))
    assert err.value.transient
    fakes[2].fail["write"] = ValueError("bad frame")
    with pytest.raises(BackendError) as err:
        comp.write(np.ones(7))
    assert not err.value.transient and "base: busy" in str(err.value) and "right: ValueError" in str(err.value)


@pytest.mark.parametrize("op, call", [("estop", lambda c: c.estop()), ("release_estop", lambda c: c.release_estop()),
                                      ("on_fault", lambda c: c.on_fault("x")), ("close", lambda c: c.close()),
                                      ("recover", lambda c: c.recover(1.0))])
def test_stops_and_recovery_reach_every_part_even_when_one_raises(op, call):
    comp, fakes = three_parts(name="Robot")
    fakes[0].fail[op] = BackendError("no answer", transient=True)
    fakes[1].fail[op] = OSError("socket gone")
    with pytest.raises(BackendError) as err:
        call(comp)
    assert all(op in f.calls for f in fakes)
    msg = str(err.value)
    assert not err.value.transient
    assert msg.startswith("Robot ") and "left: no answer" in msg and "base: OSError: socket gone" in msg
    assert "right" not in msg


def test_recover_with_no_time_left_names_the_part():
    comp, fakes = three_parts()
    with pytest.raises(BackendError, match="left: no time left"):
        comp.recover(0.0)


# ---------------------------------------------------------------------- connect


def test_connect_opens_every_part():
    comp, fakes = three_parts()
    comp.connect(1.0)
    assert all(f.connected for f in fakes)


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_connect_failure_closes_the_others_and_names_the_part(failing):
    comp, fakes = three_parts(name="Robot")
    fakes[failing].fail["connect"] = BackendError("no feedback", transient=True)
    with pytest.raises(BackendError) as err:
        comp.connect(1.0)
    assert not err.value.transient
    assert str(err.value) == f"Robot {comp.parts[failing].name}: no feedback"
    assert not any(f.connected for f in fakes)
    for k, f in enumerate(fakes):  # the opened ones and the failing one closed; later ones never touched
        assert ("close" in f.calls) == (k <= failing)
        assert ("connect" in f.calls) == (k <= failing)


def test_connect_shares_one_deadline():
    seen: list[float] = []

    class Slow(FakePart):
        def connect(self, timeout_s: float) -> None:
            seen.append(timeout_s)
            import time
            time.sleep(0.05)
            super().connect(timeout_s)

    fakes = [Slow(1), Slow(1)]
    comp = CompositeBackend([Part("a", [0], fakes[0]), Part("b", [1], fakes[1])])
    comp.connect(1.0)
    assert seen[0] <= 1.0 and seen[1] <= 1.0 - 0.04


# ---------------------------------------------------------------------- the driver sees one robot


F = MessageFactory()


def cobot_like() -> tuple[CompositeBackend, list[FakePart], object]:
    """The Cobot Magic's 14-dof embodiment, as two 7-value fake arms."""
    emb = load_embodiment("cobot_magic")
    fakes = [FakePart(7), FakePart(7)]
    for f, half in zip(fakes, (emb.home[:7], emb.home[7:])):
        f.position = half.copy()
    comp = CompositeBackend([Part("left_arm", slice(0, 7), fakes[0]), Part("right_arm", slice(7, 14), fakes[1])],
                            name="Robot")
    return comp, fakes, emb


def armed_driver(comp, emb) -> tuple[Driver, int]:
    drv = Driver(emb, comp, lease_ttl_s=10.0)
    drv.connect(1.0)
    lease = drv.handle(F.make("acquire", client="t"), 0)["lease"]
    drv.handle(F.make("arm", lease=lease), 0)
    assert drv.mode == Mode.ARMED
    return drv, lease


def test_a_fault_of_one_part_faults_the_robot_and_every_part_hears_of_it():
    comp, fakes, emb = cobot_like()
    drv, _ = armed_driver(comp, emb)
    dt_ns = int(1e9 / emb.control_rate_hz)
    drv.tick(dt_ns)
    fakes[1].fault = "joint_3 over current"
    drv.tick(2 * dt_ns)
    assert drv.mode == Mode.FAULT
    assert "right_arm: joint_3 over current" in drv.reason and "left_arm" not in drv.reason
    assert "on_fault" in fakes[0].calls and "on_fault" in fakes[1].calls


def test_the_driver_estop_reaches_both_parts_when_the_first_raises():
    comp, fakes, emb = cobot_like()
    drv, lease = armed_driver(comp, emb)
    fakes[0].fail["estop"] = BackendError("CAN down", transient=False)
    drv.handle(F.make("estop", reason="test"), 0)
    assert drv.mode == Mode.ESTOP
    assert "estop" in fakes[1].calls
    assert "left_arm: CAN down" in drv.reason


def test_a_part_read_error_that_persists_faults_the_robot():
    comp, fakes, emb = cobot_like()
    drv, _ = armed_driver(comp, emb)
    fakes[0].fail["read"] = BackendError("stale", transient=False)
    drv.tick(int(1e9 / emb.control_rate_hz))
    assert drv.mode == Mode.FAULT and "left_arm: stale" in drv.reason
    assert "on_fault" in fakes[1].calls


OPS = {"estop": lambda c: c.estop(), "release_estop": lambda c: c.release_estop(),
       "on_fault": lambda c: c.on_fault("x"), "close": lambda c: c.close(), "recover": lambda c: c.recover(5.0),
       "write": lambda c: c.write(np.arange(7.0)), "read": lambda c: c.read()}
FAILURES = st.sampled_from([None, BackendError("slow", transient=True), BackendError("gone", transient=False),
                            RuntimeError("sdk"), OSError("io")])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(OPS)), st.lists(FAILURES, min_size=3, max_size=3))
def test_every_part_gets_every_call_and_exactly_the_failing_parts_are_named(op, failures):
    comp, fakes = three_parts(name="Robot")
    for f, exc in zip(fakes, failures):
        if exc is not None:
            f.fail[op] = exc
    failing = [p.name for p, exc in zip(comp.parts, failures) if exc is not None]
    if not failing:
        OPS[op](comp)
    else:
        with pytest.raises(BackendError) as err:
            OPS[op](comp)
        msg = str(err.value)
        assert all(f"{name}: " in msg for name in failing)
        assert not any(f"{p.name}: " in msg for p in comp.parts if p.name not in failing)
        only_transient = all(isinstance(exc, BackendError) and exc.transient for exc in failures if exc is not None)
        # A stop or a recovery that failed anywhere is never "try again later"; i/o keeps transient.
        assert err.value.transient == (op in ("read", "write") and only_transient)
    assert all(f.calls == [op] for f in fakes)  # each part got the call once, whoever failed before it
