"""A driver under systemd's notify protocol, with a socket of ours standing in for systemd (which is
not PID 1 here, so units cannot be started): READY only once connected, disarmed and serving;
WATCHDOG=1 from the control loop at least every WatchdogSec/2; STATUS with the mode; STOPPING=1 on
SIGTERM; the e-stop latch in ARMADA_STATE_DIR; and a stuck control loop stops the pings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from armada.drivers.core.notify import Notifier
from armada.drivers.core.process import DriverProcess, make_backend
from armada.runtime.config import REPO_ROOT, SCRIPTED_CELL, load_cell
from armada.runtime.transport import CommandClient

pytestmark = pytest.mark.hil


class NotifyListener:
    """Binds a datagram socket like systemd's and keeps (monotonic time, message) of everything sent."""

    def __init__(self, path: Path):
        self.address = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def wait_for(self, prefix: str, timeout_s: float, after: float = 0.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, msg in list(self.got):
                if t >= after and msg.startswith(prefix):
                    return t, msg
            time.sleep(0.01)
        raise AssertionError(f"no {prefix!r} within {timeout_s} s; got {[m for _, m in self.got]}")

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, msg in list(self.got) if msg == "WATCHDOG=1" and start <= t <= end]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.sock.close()


@pytest.fixture
def listener(short_tmp):
    lis = NotifyListener(short_tmp / "notify")
    yield lis
    lis.close()


def _max_gap(times: list[float], start: float, end: float) -> float:
    edges = [start, *times, end]
    return max(b - a for a, b in zip(edges, edges[1:]))


def test_driver_process_speaks_sd_notify(short_tmp, listener):
    run_dir, state_dir = short_tmp / "run", short_tmp / "state"
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000", ARMADA_STATE_DIR=str(state_dir))
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "driver", str(SCRIPTED_CELL), "--name", "arm",
                             "--run-dir", str(run_dir)], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    try:
        t_ready, ready = listener.wait_for("READY=1", 20.0)
        assert ready == "READY=1\nSTATUS=idle"  # connected and disarmed
        assert [m for _, m in listener.got][0] == ready  # nothing (no watchdog) before READY
        cell = load_cell(SCRIPTED_CELL, run_dir)
        client = CommandClient(ctx, cell.drivers[0].cmd, default_timeout_s=2.0)
        # Serving when READY says so: the first command is answered.
        assert client.request("stats")["mode"] == "idle"

        # WATCHDOG=1 from the loop: never silent for WatchdogSec (1 s), pinged about every 0.5 s.
        time.sleep(2.2)
        end = time.monotonic()
        pings = listener.pings(t_ready, end)
        assert len(pings) >= 3, listener.got
        assert _max_gap(pings, t_ready, end) < 1.0, pings

        # STATUS follows the mode; the latch goes to the state dir, not the run dir.
        t = time.monotonic()
        assert client.request("estop", reason="test")["mode"] == "estop"
        _, status = listener.wait_for("STATUS=estop", 2.0, after=t)
        assert "test" in status
        assert (state_dir / "arm.estop").exists() and not (run_dir / "arm.estop").exists()
        client.socket.close(0)

        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stopping = listener.wait_for("STOPPING=1", 5.0, after=t)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctx.term()
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert "Traceback" not in out, out


def test_a_restarted_driver_is_ready_still_estopped(short_tmp, listener):
    """The latch in the state dir survives a restart: READY says estop, never idle."""
    state_dir = short_tmp / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "arm.estop").write_text('{"reason": "pressed before"}')
    os.chmod(state_dir / "arm.estop", 0o600)
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, ARMADA_STATE_DIR=str(state_dir))
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "driver", str(SCRIPTED_CELL), "--name", "arm",
                             "--run-dir", str(short_tmp / "run")], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, ready = listener.wait_for("READY=1", 20.0)
        assert ready.startswith("READY=1\nSTATUS=estop: latched before restart"), ready
        assert not listener.pings(0, time.monotonic())  # no WATCHDOG_USEC: no pings
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_a_stuck_control_loop_stops_the_watchdog_pings(short_tmp, listener):
    """Inject a stall into the device read (inside the tick): the process and its other threads live
    on, but no WATCHDOG=1 leaves until the loop ticks again."""
    cell = load_cell(SCRIPTED_CELL, short_tmp)
    cfg = cell.drivers[0]
    emb = cell.embodiment(cfg)
    backend = make_backend(cfg, emb, cell.folder)
    stall = threading.Event()
    released = threading.Event()
    read = backend.read

    def stalling_read():
        if stall.is_set():
            released.wait(10.0)
        return read()

    backend.read = stalling_read
    notifier = Notifier.from_env({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
    process = DriverProcess(cfg, emb, backend, cell, short_tmp, notifier=notifier)
    switch = sys.getswitchinterval()
    runner = threading.Thread(target=process.run, daemon=True)
    runner.start()
    try:
        t_ready, _ = listener.wait_for("READY=1", 10.0)
        time.sleep(0.6)
        before = listener.pings(t_ready, time.monotonic())
        assert len(before) >= 3, listener.got

        stall.set()
        time.sleep(0.1)  # the tick under way when the stall was set may still ping
        t0 = time.monotonic()
        time.sleep(0.8)  # four watchdog intervals (WatchdogSec 0.2 s): systemd would have killed it
        assert listener.pings(t0, time.monotonic()) == []
        assert runner.is_alive()  # a live process, a stuck loop: exactly what the watchdog must catch

        stall.clear()
        released.set()
        t1 = time.monotonic()
        listener.wait_for("WATCHDOG=1", 1.0, after=t1)
    finally:
        stall.clear()
        released.set()
        process.request_stop()
        runner.join(5.0)
        sys.setswitchinterval(switch)
    assert not runner.is_alive()
    listener.wait_for("STOPPING=1", 1.0)


def test_without_notify_socket_nothing_is_sent(short_tmp, listener):
    """A driver run by hand or by `armada run` (no NOTIFY_SOCKET): silent, even with WATCHDOG_USEC set."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["WATCHDOG_USEC"] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "driver", str(SCRIPTED_CELL), "--name", "arm",
                             "--run-dir", str(short_tmp / "run")], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    try:
        client = CommandClient(ctx, load_cell(SCRIPTED_CELL, short_tmp / "run").drivers[0].cmd, default_timeout_s=20.0)
        assert client.request("stats")["mode"] == "idle"
        time.sleep(0.5)
        client.socket.close(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        ctx.term()
    assert listener.got == []


@pytest.mark.parametrize("role,args,ready", [("camera", ["--name", "front"], "READY=1\nSTATUS=streaming"),
                                             ("infer", [], "READY=1\nSTATUS=serving")])
def test_camera_and_inference_processes_speak_sd_notify(short_tmp, listener, role, args, ready):
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", role, str(SCRIPTED_CELL), *args,
                             "--run-dir", str(short_tmp / "run")], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_ready, got = listener.wait_for("READY=1", 30.0)
        assert got == ready
        time.sleep(1.6)
        end = time.monotonic()
        pings = listener.pings(t_ready, end)
        assert len(pings) >= 2 and _max_gap(pings, t_ready, end) < 1.0, pings
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1", 5.0, after=t)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_ready_before_the_device_is_connected(short_tmp, listener):
    """READY waits for the device: a connect that takes its time holds it back (and one that fails
    sends nothing: the process exits and systemd sees a failed start)."""
    cell = load_cell(SCRIPTED_CELL, short_tmp)
    cfg = cell.drivers[0]
    emb = cell.embodiment(cfg)
    backend = make_backend(cfg, emb, cell.folder)
    connected = threading.Event()
    connect = backend.connect

    def slow_connect(timeout_s: float) -> None:
        connected.wait(10.0)
        connect(timeout_s)

    backend.connect = slow_connect
    process = DriverProcess(cfg, emb, backend, cell, short_tmp,
                            notifier=Notifier.from_env({"NOTIFY_SOCKET": listener.address}))
    switch = sys.getswitchinterval()
    runner = threading.Thread(target=process.run, daemon=True)
    runner.start()
    try:
        time.sleep(0.5)
        assert listener.got == []
        t = time.monotonic()
        connected.set()
        listener.wait_for("READY=1\nSTATUS=idle", 5.0, after=t)
    finally:
        connected.set()
        process.request_stop()
        runner.join(5.0)
        sys.setswitchinterval(switch)


def test_a_state_dir_others_can_write_is_refused(short_tmp):
    """Whoever can write the latch can clear an e-stop: a state dir open to others stops the driver."""
    state_dir = short_tmp / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o777)
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["ARMADA_STATE_DIR"] = str(state_dir)
    result = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "driver", str(SCRIPTED_CELL), "--name", "arm",
                             "--run-dir", str(short_tmp / "run")], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "ARMADA_STATE_DIR" in result.stderr and "open to group or other users" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
