"""One set of checks for every registered backend, through its plugin (the real vendor SDK, in its
worker process) against its protocol-level fake.

A new device gets these for free: register its plugin and add a starter to ``STARTERS`` below
(``test_every_registered_kind_has_a_starter`` fails until then). A starter brings up the kind's fake
and returns a ``Rig``: the build context of a driver on that fake, and what the fake can tell
(the commands it received, whether torque is still on) and do (go silent); None where it cannot.

Checks: connect; read (shape, finite); a write within the limits reaches the device; on_fault
stops everything reaching the device; close never cuts torque; silence becomes a read error or a
fault within a bound; no device at all is a clear error within 5 s.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.registry import BACKENDS, BuildContext
from armada.runtime.config import DriverConfig, EmbodimentConfig, load_embodiment

pytestmark = pytest.mark.hil

CONNECT_TIMEOUT_S = 10.0
NO_DEVICE_BOUND_S = 5.0  # a connect to nothing must fail, clearly, within this
# Silence must show within this (read errors past stale_s, 0.05-0.2 s, plus a loaded 2-core host).
SILENCE_BOUND_S = 2.0
STEP = 0.05  # rad: the write that must reach the device (about 3 degrees)
TICK_S = 0.01


@dataclass
class Rig:
    ctx: BuildContext
    # How many position commands the device has received so far (None: the fake cannot tell).
    received: Callable[[], int] | None
    # Whether the device still has torque on / motors enabled (None: cannot tell).
    torque_on: Callable[[], bool] | None
    # Make the device go silent (a pulled cable, lost power), None for a device with no link.
    silence: Callable[[], None] | None
    # A build context of the same kind pointing where no device is (None: the kind has no device).
    nowhere: BuildContext | None


def _context(kind: str, embodiment: str, backend: dict, cell_dir: Path) -> BuildContext:
    plugin = BACKENDS.get(kind)
    drv = DriverConfig(name="dut", embodiment=embodiment, backend=backend, state="ipc://unused-state",
                       cmd="ipc://unused-cmd")
    emb = load_embodiment(embodiment)
    if plugin.check_embodiment is not None:
        plugin.check_embodiment(drv.backend, emb)  # as load_cell does
    return BuildContext(driver=drv, embodiment=emb, cell_dir=cell_dir)


# --------------------------------------------------------------------------- starters, one per kind


@contextlib.contextmanager
def _mock(tmp: Path, monkeypatch) -> Iterator[Rig]:
    # The mock arm has no link to lose, no torque and no device to be missing.
    yield Rig(_context("mock", "mock_arm", {"kind": "mock", "tracking_time_constant_s": 0.02}, tmp), None, None,
              None, None)


@contextlib.contextmanager
def _ur3(tmp: Path, monkeypatch) -> Iterator[Rig]:
    pytest.importorskip("rtde_control")
    from armada.drivers.ur3.fake.launch import FakeStartError, FakeUR, free_loopback_host

    try:
        fake = FakeUR.start_anywhere()
    except FakeStartError as exc:
        pytest.skip(str(exc))
    targets: list[list[float]] = []

    def received() -> int:
        targets.extend(fake.targets())
        return len(targets)

    def torque_on() -> bool:
        # The backend may stop its script (servoStop, stopScript); it must never power the arm off.
        said = " ".join(line.lower() for line in json.loads(fake.cmd("log")))
        return not any(cmd in said for cmd in ("power off", "shutdown", "brake"))

    nowhere_host = free_loopback_host()
    try:
        yield Rig(_context("ur3", "ur3", {"kind": "ur3", "host": fake.host}, tmp), received, torque_on,
                  lambda: fake.cmd("silent 1"),
                  None if nowhere_host is None else _context("ur3", "ur3", {"kind": "ur3", "host": nowhere_host}, tmp))
    finally:
        fake.close()


@contextlib.contextmanager
def _piper_fake(channels: int, monkeypatch) -> Iterator:
    pytest.importorskip("piper_sdk")
    from armada.drivers.piper.fake.client import FakePiperProcess, free_udp_port, random_group

    port = free_udp_port()
    monkeypatch.setenv("CAN_CONFIG", f'{{"port": {port}}}')  # the worker process inherits it
    groups = [random_group() for _ in range(channels)]
    while len(set(groups)) < channels:
        groups = [random_group() for _ in range(channels)]
    with FakePiperProcess(groups, port, "--home") as fake:
        yield fake, groups


def _piper_probes(fake, groups: list[str]):
    def received() -> int:
        return sum(len(fake.targets(g)) for g in groups)

    def torque_on() -> bool:
        return all(all(fake.state(g)["enabled"]) for g in groups)

    return received, torque_on


def _nowhere_groups(count: int) -> list[str]:
    from armada.drivers.piper.fake.client import random_group

    return [random_group() for _ in range(count)]


@contextlib.contextmanager
def _piper(tmp: Path, monkeypatch) -> Iterator[Rig]:
    with _piper_fake(1, monkeypatch) as (fake, groups):
        received, torque_on = _piper_probes(fake, groups)
        backend = {"kind": "piper", "can": groups[0], "bustype": "udp_multicast"}
        nowhere = {**backend, "can": _nowhere_groups(1)[0]}
        yield Rig(_context("piper", "piper", backend, tmp), received, torque_on,
                  lambda: fake.cmd(f"silent {groups[0]} 1"), _context("piper", "piper", nowhere, tmp))


@contextlib.contextmanager
def _cobot_magic(tmp: Path, monkeypatch) -> Iterator[Rig]:
    with _piper_fake(2, monkeypatch) as (fake, groups):
        received, torque_on = _piper_probes(fake, groups)
        backend = {"kind": "cobot_magic", "left_can": groups[0], "right_can": groups[1], "bustype": "udp_multicast"}
        left, right = _nowhere_groups(2)
        nowhere = {**backend, "left_can": left, "right_can": right if right != left else groups[1]}
        yield Rig(_context("cobot_magic", "cobot_magic", backend, tmp), received, torque_on,
                  lambda: fake.cmd(f"silent {groups[1]} 1"), _context("cobot_magic", "cobot_magic", nowhere, tmp))


@contextlib.contextmanager
def _aloha(tmp: Path, monkeypatch) -> Iterator[Rig]:
    pytest.importorskip("dynamixel_sdk")
    from armada.drivers.aloha.fake.aloha import AlohaFake

    with AlohaFake(leaders=False) as fake:
        followers = ("puppet_left", "puppet_right")

        def received() -> int:
            return sum(len(fake.bus(b).received_goals) for b in followers)

        def torque_on() -> bool:
            return all(fake.command({"op": "torque", "bus": b})["torque"][str(i)] == 1
                       for b in followers for i in fake.bus(b).ids())

        def silence() -> None:  # the cable to the left arm comes off: nobody answers on its bus
            for i in fake.bus("puppet_left").ids():
                fake.bus("puppet_left").set_missing(i)

        backend = {"kind": "aloha", "left_follower_port": fake.ports["puppet_left"],
                   "right_follower_port": fake.ports["puppet_right"]}
        nowhere = {**backend, "left_follower_port": str(tmp / "ttyDXL_nothing_left"),
                   "right_follower_port": str(tmp / "ttyDXL_nothing_right")}
        yield Rig(_context("aloha", "aloha", backend, tmp), received, torque_on, silence,
                  _context("aloha", "aloha", nowhere, tmp))


@contextlib.contextmanager
def _so101(tmp: Path, monkeypatch) -> Iterator[Rig]:
    pytest.importorskip("lerobot.motors.feetech")
    from armada.drivers.so101.bench import BENCH_CALIBRATION
    from armada.drivers.so101.fake.so101 import So101Fake

    (tmp / "so101.json").write_text(json.dumps(BENCH_CALIBRATION))  # lerobot's calibration JSON

    def context(backend: dict) -> BuildContext:
        drv = DriverConfig(name="dut", embodiment="so101", backend=backend, state="ipc://unused-state",
                           cmd="ipc://unused-cmd", joint_calibration=str(tmp / "so101.json"))
        emb = load_embodiment("so101")
        BACKENDS.get("so101").check_embodiment(drv.backend, emb)
        return BuildContext(driver=drv, embodiment=emb, cell_dir=tmp)

    with So101Fake(leader=False) as fake:
        bus = fake.bus("follower")

        def silence() -> None:  # the cable comes off: nobody answers
            for i in bus.ids():
                bus.set_missing(i)

        yield Rig(context({"kind": "so101", "port": fake.ports["follower"]}), lambda: len(bus.received_goals),
                  lambda: all(bus.register(i, 40) == 1 for i in bus.ids()), silence,
                  context({"kind": "so101", "port": str(tmp / "ttySO101_nothing")}))


@contextlib.contextmanager
def _mujoco(tmp: Path, monkeypatch) -> Iterator[Rig]:
    # The simulated SO-101: no link to lose, no torque to cut, no device to be missing.
    pytest.importorskip("mujoco")
    yield Rig(_context("mujoco", "so101", {"kind": "mujoco", "scene": "so101", "task": "reach_cube"}, tmp), None,
              None, None, None)


@contextlib.contextmanager
def _arx_lift2(tmp: Path, monkeypatch) -> Iterator[Rig]:
    # The kinematic fakes behind the vendor adapters, in this process; they report through files.
    from armada.drivers.arx_lift2.sim import read_commands, read_status, write_control

    devices = ("left_arm", "right_arm", "body")
    here, nowhere = tmp / "arx", tmp / "arx_nowhere"
    here.mkdir()
    nowhere.mkdir()
    write_control(nowhere, {"power": False})  # switched off: no arm answers, the body's feedback never moves

    def torque_on() -> bool:
        return all((read_status(here, d) or {}).get("torque_on") for d in devices)

    def context(fake_dir: Path) -> BuildContext:
        return _context("arx_lift2", "arx_lift2", {"kind": "arx_lift2", "fake": True, "fake_dir": str(fake_dir)}, tmp)

    yield Rig(context(here), lambda: sum(read_commands(here, d) for d in devices), torque_on,
              lambda: write_control(here, {"right_arm": {"silent": True}}), context(nowhere))


STARTERS: dict[str, Callable[[Path, pytest.MonkeyPatch], contextlib.AbstractContextManager[Rig]]] = {
    "mujoco": _mujoco, "mock": _mock, "ur3": _ur3, "piper": _piper, "cobot_magic": _cobot_magic, "aloha": _aloha, "so101": _so101,
    "arx_lift2": _arx_lift2,
}


def test_every_registered_kind_has_a_starter():
    missing = sorted(set(BACKENDS.kinds()) - set(STARTERS))
    assert missing == [], f"registered backend kinds without a conformance starter: {missing} (add one to STARTERS)"
    assert BACKENDS.broken() == {}, BACKENDS.broken()


@pytest.fixture(params=sorted(STARTERS))
def rig(request, short_tmp, monkeypatch) -> Iterator[Rig]:
    if request.param not in BACKENDS.kinds():
        pytest.skip(f"{request.param} plugin not registered")
    with STARTERS[request.param](short_tmp, monkeypatch) as r:
        yield r


# --------------------------------------------------------------------------- the checks


def _build(ctx: BuildContext) -> Backend:
    return BACKENDS.get(ctx.driver.backend.kind).build(ctx)


def _read(backend: Backend, emb: EmbodimentConfig) -> Reading:
    for _ in range(MAX_TRANSIENT_IN_A_ROW):
        try:
            reading = backend.read()
            break
        except BackendError as exc:
            if not exc.transient:
                raise
            time.sleep(TICK_S)
    else:
        reading = backend.read()
    assert isinstance(reading, Reading)
    assert reading.position.shape == (emb.dof,), f"position shape {reading.position.shape}, dof {emb.dof}"
    assert np.all(np.isfinite(reading.position))
    assert reading.fault is None and not reading.estopped, (reading.fault, reading.estopped)
    return reading


def _target(emb: EmbodimentConfig, q: np.ndarray, step: float) -> np.ndarray:
    """``q`` with its first joint ``step`` further, toward the middle of its range: within limits."""
    target = q.copy()
    middle = (emb.lower[0] + emb.upper[0]) / 2
    target[0] += step if q[0] <= middle else -step
    margin = emb.position_margin
    return np.clip(target, emb.lower + margin, emb.upper - margin)


# The driver retries transient read errors for 0.1 s before it faults; a loaded host may cause one.
MAX_TRANSIENT_IN_A_ROW = 10


def _stream(backend: Backend, target: np.ndarray, seconds: float) -> None:
    """Write the same target every tick for a while, as the driver's loop does when holding."""
    end = time.monotonic() + seconds
    failed: list[str] = []
    while time.monotonic() < end:
        try:
            backend.read()
            backend.write(target)
            failed.clear()
        except BackendError as exc:
            if not exc.transient:
                raise
            failed.append(str(exc))
            assert len(failed) < MAX_TRANSIENT_IN_A_ROW, f"{len(failed)} transient errors in a row: {failed[-3:]}"
        time.sleep(TICK_S)


def test_connect_read_write_on_fault_and_close(rig: Rig):
    emb = rig.ctx.embodiment
    backend = _build(rig.ctx)
    backend.connect(CONNECT_TIMEOUT_S)
    closed = False
    try:
        q0 = _read(backend, emb).position
        # A write within the limits reaches the device: it moves there.
        target = _target(emb, q0, STEP)
        before = rig.received() if rig.received else 0
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            _stream(backend, target, 0.1)
            if abs(_read(backend, emb).position[0] - target[0]) < STEP / 3:
                break
        q1 = _read(backend, emb).position
        assert abs(q1[0] - target[0]) < STEP / 3, f"joint 0 at {q1[0]:.4f}, target {target[0]:.4f} (from {q0[0]:.4f})"
        if rig.received is not None:
            assert rig.received() > before
        # on_fault: nothing reaches the device any more (no SDK resend, no queued command).
        backend.on_fault("conformance test")
        if rig.received is not None:
            time.sleep(0.2)  # what was on the wire lands
            count = rig.received()
            time.sleep(0.5)
            assert rig.received() == count, "the device received commands after on_fault"
        backend.close()
        closed = True
        time.sleep(0.2)
        if rig.torque_on is not None:
            assert rig.torque_on(), "close cut torque (or disabled the motors)"
    finally:
        if not closed:
            backend.close()


def test_silence_becomes_a_read_error_or_a_fault(rig: Rig):
    if rig.silence is None:
        pytest.skip("the device has no link to lose")
    emb = rig.ctx.embodiment
    backend = _build(rig.ctx)
    backend.connect(CONNECT_TIMEOUT_S)
    try:
        _read(backend, emb)
        rig.silence()
        started = time.monotonic()
        seen = None
        while time.monotonic() - started < SILENCE_BOUND_S:
            try:
                reading = backend.read()
            except BackendError as exc:
                seen = f"read error: {exc}"
                break
            if reading.fault is not None or reading.estopped:
                seen = f"fault: {reading.fault}"
                break
            time.sleep(TICK_S)
        assert seen is not None, f"{SILENCE_BOUND_S} s of silence and every read still succeeds"
        assert str(seen).strip(), "an error without a message"
    finally:
        backend.close()


def test_no_device_is_a_clear_error_within_5_s(rig: Rig):
    if rig.nowhere is None:
        pytest.skip("the kind has no device to be missing")
    backend = _build(rig.nowhere)
    started = time.monotonic()
    try:
        with pytest.raises(BackendError) as info:
            backend.connect(2.0)
        elapsed = time.monotonic() - started
    finally:
        backend.close()
    assert elapsed < NO_DEVICE_BOUND_S, f"took {elapsed:.1f} s to say there is no device"
    assert info.value.transient is False
    assert len(str(info.value)) > 20, f"not a clear error: {info.value!r}"
