"""The stop path: nothing that arrives on the command socket, no plan and no recovery delays an
e-stop; a dead thread takes the driver down; the latch survives a restart.

Bounds are generous (a loaded 2-core CI machine, no real-time priority): on the code before
issue 9 a flood delayed e-stop replies by seconds, a slow move_to stopped the loop for 2.5 s and
a recovery held the lock for its whole duration. `armada bench estop` gives the real numbers.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
import zmq

from armada.drivers.core.backend import BackendError, Reading
from armada.drivers.core.process import DriverProcess
from armada.drivers.core.stop_bench import DriverUnderTest, measure_estops, start_flooders
from armada.drivers.mock.arm import MockArm
from armada.runtime.config import SCRIPTED_CELL, driver_embodiment, load_cell
from armada.runtime.transport import CommandClient, RemoteError
from tests.hil.helpers import StateRecorder

pytestmark = pytest.mark.hil

EFFECT_BOUND_MS = 50.0  # p50 bound for the e-stop reaching the device during a flood
WORST_BOUND_MS = 500.0  # any single press, on a loaded machine (the old code: p50 1 to 3 s)


@pytest.fixture
def dut():
    d = DriverUnderTest()
    yield d
    d.close()


def _state_rate(dut: DriverUnderTest, seconds: float) -> float:
    n0 = len(dut.states)
    time.sleep(seconds)
    return (len(dut.states) - n0) / seconds


def test_estop_takes_effect_during_and_after_a_flood_of_the_worst_messages(dut):
    flooders = start_flooders(dut.cfg.cmd, dut.emb.dof, 3, seconds=8.0)
    try:
        time.sleep(1.0)
        during = measure_estops(dut, 4.0)
        assert dut.proc.poll() is None, "the driver died under the flood"
        assert _state_rate(dut, 0.5) > 100, "state stopped publishing during the flood"
    finally:
        for p in flooders:
            p.terminate()
            p.join(5)
    after = measure_estops(dut, 1.0, seed=1)
    for name, result in (("during", during), ("after", after)):
        device = np.array(result["device_ms"])
        assert len(device) >= 5 and len(device) == len(result["reply_ms"]), name
        assert np.median(device) < EFFECT_BOUND_MS and device.max() < WORST_BOUND_MS, (name, device)
        assert np.max(result["reply_ms"]) < WORST_BOUND_MS, (name, result["reply_ms"])
    counters = dut.states[-1]["counters"]
    assert counters["rejected_messages"] > 100  # the flood did reach the driver
    assert dut.proc.poll() is None and _state_rate(dut, 0.5) > 100


def test_a_spinning_loop_keeps_the_stop_path_and_its_ticks_under_the_flood():
    """loop_spin_us at its largest (half the period) yields the CPU for 1 ms of every 2 ms tick:
    e-stops still take effect and state keeps coming (its timing is `armada bench loop`'s)."""
    dut = DriverUnderTest(loop_spin_us=1000.0)
    flooders = start_flooders(dut.cfg.cmd, dut.emb.dof, 3, seconds=6.0)
    try:
        time.sleep(1.0)
        result = measure_estops(dut, 3.0)
        assert dut.proc.poll() is None and _state_rate(dut, 0.5) > 100
    finally:
        for p in flooders:
            p.terminate()
            p.join(5)
        dut.close()
    device = np.array(result["device_ms"])
    assert len(device) >= 5 and np.median(device) < EFFECT_BOUND_MS and device.max() < WORST_BOUND_MS, device


def test_armada_driver_itself_keeps_its_stop_path_under_the_flood(short_tmp):
    """The production entry point (``armada driver`` under the supervisor), not the bench's."""
    from armada.runtime.supervisor import CellProcesses

    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        cfg = procs.cell.drivers[0]
        emb = driver_embodiment(SCRIPTED_CELL, cfg)
        rec = StateRecorder(procs.ctx, cfg.state)
        op = CommandClient(procs.ctx, cfg.cmd, default_timeout_s=2.0)
        flooders = start_flooders(cfg.cmd, emb.dof, 3, seconds=8.0)
        try:
            time.sleep(0.5)
            latencies = []
            for i in range(10):
                t0 = time.monotonic()
                assert op.request("estop", reason=f"press {i}")["mode"] == "estop"
                latencies.append(time.monotonic() - t0)
                lease = op.request("acquire", client="op")["lease"]
                op.request("reset_estop", lease=lease)
                op.request("release", lease=lease)
            assert np.median(latencies) < EFFECT_BOUND_MS / 1e3 and max(latencies) < WORST_BOUND_MS / 1e3, latencies
            assert procs.child("arm").proc.poll() is None
            t0_ns = time.monotonic_ns()
            time.sleep(0.5)
            stamped = rec.stamped_between(t0_ns, t0_ns + int(0.5e9))
            assert len(stamped) > 100, "state stopped publishing during the flood"
        finally:
            for p in flooders:
                p.terminate()
                p.join(5)
            op.close()
            rec.stop()


def test_a_very_slow_move_to_is_refused_at_once_and_the_loop_keeps_ticking(dut):
    client = dut.client
    lease = client.request("acquire", client="t")["lease"]
    client.request("arm", lease=lease)
    t0 = time.monotonic_ns()
    target = dut.emb.home + np.r_[1.0, np.zeros(dut.emb.dof - 1)]
    with pytest.raises(RemoteError) as err:
        client.request("move_to", lease=lease, target=target, max_velocity=0.0011)
    assert err.value.code == "bad_value" and "longer than" in err.value.reason
    assert (time.monotonic_ns() - t0) * 1e-9 < 0.5
    # Wait for the driver's own stamps to pass t0 + 250 ms: the recorder thread may lag on a loaded
    # host, and a fixed sleep then measured the recorder, not the driver loop.
    until = t0 + 250_000_000
    assert dut.state_after(until, lambda m: True, 5.0) is not None, "no state after the refused move"
    stamps = np.array([m["mono_ns"] for m in list(dut.states) if t0 - 100_000_000 <= m["mono_ns"] <= until])
    assert stamps.size > 50 and np.diff(stamps).max() < 100e6  # was 2.46 s without a tick
    # A long but acceptable move is planned outside the lock and runs.
    reply = client.request("move_to", lease=lease, target=target, max_velocity=0.05)
    assert 19 < reply["duration_s"] < 21
    assert dut.state_after(t0, lambda m: m["mode"] == "running", 1.0) is not None
    t1 = time.monotonic_ns()
    assert client.request("estop", reason="stop the long move")["mode"] == "estop"
    assert dut.state_after(t1, lambda m: m["device"]["estop_ns"] >= t1, 1.0) is not None


def test_lease_token_from_another_connection_is_refused(dut):
    lease = dut.client.request("acquire", client="policy")["lease"]
    thief = CommandClient(dut.ctx, dut.cfg.cmd, default_timeout_s=1.0)
    try:
        with pytest.raises(RemoteError) as err:
            thief.request("arm", lease=lease)
        assert err.value.code == "no_lease" and "another connection" in err.value.reason
    finally:
        thief.close()
    assert dut.client.request("arm", lease=lease)["mode"] == "armed"


def test_estop_latch_survives_a_kill_and_restart_of_the_driver(dut):
    assert dut.client.request("estop", reason="pressed before the crash")["mode"] == "estop"
    assert (dut.run_dir / f"{dut.cfg.name}.estop").exists()
    dut.restart(hard=True)
    hello = dut.client.request("ping")
    assert hello["mode"] == "estop"
    state = dut.state_after(0, lambda m: m["mode"] == "estop", 2.0)
    assert "latched before restart" in state["reason"] and "pressed before the crash" in state["reason"]
    lease = dut.client.request("acquire", client="op")["lease"]
    assert dut.client.request("reset_estop", lease=lease)["mode"] == "idle"
    assert not (dut.run_dir / f"{dut.cfg.name}.estop").exists()
    dut.restart(hard=False)
    assert dut.client.request("ping")["mode"] == "idle"


# ---------------------------------------------------------------- in-process: recovery, dying threads


class HangingRecoveryArm(MockArm):
    """Reads fail on demand; recover() hangs like a reconnect to a silent controller."""

    def __init__(self, *a, recover_s: float, **kw):
        super().__init__(*a, **kw)
        self.fail_reads = False
        self.recover_s = recover_s
        self.recovering = threading.Event()
        self.estop_calls_during_recover = 0
        self.estop_calls = 0
        self.closed = False

    def read(self) -> Reading:
        if self.fail_reads:
            raise BackendError("controller silent")
        return super().read()

    def recover(self, timeout_s: float) -> None:
        self.recovering.set()
        calls = self.estop_calls
        time.sleep(self.recover_s)
        self.estop_calls_during_recover = self.estop_calls - calls
        self.fail_reads = False
        self.recovering.clear()

    def estop(self) -> None:
        self.estop_calls += 1
        super().estop()

    def close(self) -> None:
        self.closed = True
        super().close()


class InProcessDriver:
    def __init__(self, folder, backend):
        self.cell = load_cell(SCRIPTED_CELL, folder)
        self.cfg = self.cell.drivers[0]
        self.emb = driver_embodiment(SCRIPTED_CELL, self.cfg)
        self.backend = backend
        self.process = DriverProcess(self.cfg, self.emb, backend, self.cell, folder)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ctx = zmq.Context()
        self.rec = StateRecorder(self.ctx, self.cfg.state)

    def _run(self) -> None:
        try:
            self.process.run()
        except BaseException as exc:  # SystemExit included: the test inspects it
            self.error = exc

    def client(self, timeout_s: float = 1.0) -> CommandClient:
        return CommandClient(self.ctx, self.cfg.cmd, default_timeout_s=timeout_s)

    def close(self) -> None:
        self.process.request_stop()
        self.thread.join(5)
        self.rec.stop()
        self.ctx.destroy(linger=0)


def test_estop_during_a_hanging_recovery_latches_at_once_and_state_keeps_publishing(short_tmp):
    emb = driver_embodiment(SCRIPTED_CELL, load_cell(SCRIPTED_CELL, short_tmp).drivers[0])
    arm = HangingRecoveryArm(emb.home, time_constant_s=0.0, recover_s=2.0)
    drv = InProcessDriver(short_tmp, arm)
    op, button = drv.client(timeout_s=6.0), drv.client()
    try:
        lease = op.request("acquire", client="op")["lease"]
        op.request("arm", lease=lease)
        arm.fail_reads = True
        drv.rec.wait_mode("fault", 2.0)
        outcome: dict = {}

        def clear() -> None:
            try:
                outcome["reply"] = op.request("clear_fault", lease=lease)
            except RemoteError as exc:
                outcome["error"] = exc

        clearing = threading.Thread(target=clear)
        clearing.start()
        assert arm.recovering.wait(2.0)
        t0_ns = time.monotonic_ns()
        time.sleep(0.5)
        during = drv.rec.stamped_between(t0_ns, t0_ns + int(0.5e9))
        assert len(during) > 100, "no state while the device recovers"  # was 3.5 s of silence
        assert all(m.get("recovering") for m in during[5:])
        t0 = time.monotonic()
        assert button.request("estop", reason="during recovery")["mode"] == "estop"
        assert time.monotonic() - t0 < 0.2  # was a 3 s wait behind the recovery
        assert drv.rec.wait_mode("estop", 0.2)["mode"] == "estop"
        assert arm.estop_calls == 0  # the recovery owns the device until it returns
        clearing.join(5)
        assert outcome["error"].code == "estopped"
        assert arm.estop_calls_during_recover == 0 and arm.estop_calls == 1  # sent when it returned
        assert op.request("ping")["mode"] == "estop"
    finally:
        op.close()
        button.close()
        drv.close()


class Boom(BaseException):
    """Not an Exception: nothing in a handler catches it."""


def test_a_command_thread_that_dies_takes_the_process_down(short_tmp, monkeypatch):
    emb = driver_embodiment(SCRIPTED_CELL, load_cell(SCRIPTED_CELL, short_tmp).drivers[0])
    arm = HangingRecoveryArm(emb.home, time_constant_s=0.0, recover_s=0.0)
    drv = InProcessDriver(short_tmp, arm)
    client = drv.client()
    try:
        assert client.request("ping")["mode"] == "idle"

        def explode(*a, **kw):
            raise Boom("a bug beyond Exception")

        monkeypatch.setattr(drv.process.driver, "start", explode)
        with pytest.raises(TimeoutError):
            client.request("ping", timeout_s=0.5)
        drv.thread.join(5)
        assert not drv.thread.is_alive(), "the process kept running with a dead command thread"
        assert isinstance(drv.error, SystemExit) and "commands thread died" in str(drv.error.code)
        assert "Boom" in str(drv.error.code) and arm.closed
    finally:
        client.close()
        drv.close()


def test_a_realtime_cell_without_the_right_to_realtime_still_runs():
    """libzmq aborts the process when it cannot make its I/O thread real-time: ask first."""
    if os.geteuid() == 0:  # drop the right the way an unprivileged service lacks it
        if not (shutil.which("prlimit") and shutil.which("setpriv")):
            pytest.skip("needs prlimit and setpriv to drop the real-time right as root")
        wrapper = ["prlimit", "--rtprio=0", "setpriv", "--bounding-set=-sys_nice"]
    else:
        wrapper = ["prlimit", "--rtprio=0"] if shutil.which("prlimit") else []
    d = DriverUnderTest(realtime=True, wrapper=wrapper)
    try:
        assert d.client.request("estop")["mode"] == "estop"
        assert d.proc.poll() is None
    finally:
        d.close()


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_many_part_messages_are_refused_at_once_and_pin_no_memory(dut):
    """ZeroMQ bounds each part (MAXMSGSIZE), not the number of parts: messages of 100 parts of
    100 kB each are answered and dropped, do not delay a stop and leave no memory behind. (An
    attack check: the backlog bounded this before too, but held such messages until their turn.)"""
    before = _rss_mb(dut.proc.pid)
    part = b"\x81\xa4kind\xa5estop" + b"x" * 100_000  # peeks as an e-stop, if anything looked past part 1
    socks = [dut.ctx.socket(zmq.DEALER) for _ in range(4)]
    try:
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(dut.cfg.cmd)
        for _ in range(5):
            for s in socks:
                s.send_multipart([part] * 100)
        reply = socks[0].poll(5000)
        assert reply, "no error reply to a many-part message"
        assert b"expected one message part" in socks[0].recv_multipart()[-1]
        t = time.monotonic()
        assert dut.client.request("estop", reason="after parts")["mode"] == "estop"
        assert time.monotonic() - t < WORST_BOUND_MS / 1e3
        assert _rss_mb(dut.proc.pid) - before < 100, "many-part messages were kept in memory"
        assert dut.proc.poll() is None
    finally:
        for s in socks:
            s.close(0)
