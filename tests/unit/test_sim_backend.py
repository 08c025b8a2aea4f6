"""The sim control socket (drivers/sim/control.py) and the `mujoco` backend (drivers/sim/backend.py)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

mujoco = pytest.importorskip("mujoco")

from armada.drivers.sim.control import SimControl, SimControlError, SimControlServer  # noqa: E402
from armada.drivers.sim.world import SimWorld  # noqa: E402


@pytest.fixture(scope="module")
def world() -> SimWorld:
    return SimWorld("so101")


class _Pump:
    """A server polled from a background loop, as the driver's control thread would."""

    def __init__(self, server: SimControlServer):
        import threading

        self.server, self._stop = server, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.server.poll():
                self._stop.wait(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@pytest.fixture
def served(world, short_tmp, ctx):
    server = SimControlServer(f"ipc://{short_tmp}/sim", world, ctx)
    pump = _Pump(server)
    yield world, f"ipc://{short_tmp}/sim"
    pump.stop()
    server.close()


def test_reset_and_state_through_the_socket(served, ctx):
    world, endpoint = served
    world.resets = 0
    with SimControl(endpoint, timeout_s=2.0, ctx=ctx) as sim:
        objects = sim.reset("press_button", 5)
        assert list(objects) == ["button"] and len(objects["button"]) == 7
        state = sim.state()
    assert state["task"] == "press_button" and state["seed"] == 5 and state["resets"] == 1
    assert state["objects"] == objects
    assert state["tasks"] == ["reach_cube", "press_button"]
    assert len(state["qpos"]) == world.model.nq and state["success"] is False


def _raw(endpoint: str, ctx: zmq.Context, payload: bytes) -> dict:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(payload)
        assert sock.poll(2000), "no reply"
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close(0)


@pytest.mark.parametrize("payload,error", [
    (b"\xc1\xc1 not msgpack", "not a valid msgpack"),
    (msgpack.packb([1, 2, 3]), "must be a map"),
    (msgpack.packb({"cmd": "explode"}), "unknown cmd 'explode'"),
    (msgpack.packb({"cmd": "reset", "task": "fly", "seed": 1}), "unknown task|not in scene"),
    (msgpack.packb({"cmd": "reset", "task": "reach_cube", "seed": -1}), "seed"),
    (msgpack.packb({"cmd": "reset", "task": "reach_cube", "seed": "3"}), "seed"),
    (msgpack.packb({"cmd": "reset", "task": "reach_cube"}), "seed"),
    (msgpack.packb({"cmd": "reset", "task": "reach_cube", "seed": 1, "x": 1}), "x"),
    (msgpack.packb({"cmd": "state", "extra": True}), "extra"),
])
def test_bad_requests_are_answered_and_change_nothing(served, ctx, payload, error):
    import re

    world, endpoint = served
    world.reset("reach_cube", 9)
    before = (world.task, world.seed, world.resets, world.data.qpos.copy())
    reply = _raw(endpoint, ctx, payload)
    assert reply["ok"] is False and re.search(error, reply["error"]), reply
    assert (world.task, world.seed, world.resets) == before[:3]
    assert np.array_equal(world.data.qpos, before[3])


def test_refused_reset_raises_with_the_reason(served, ctx):
    _, endpoint = served
    with SimControl(endpoint, timeout_s=2.0, ctx=ctx) as sim, pytest.raises(SimControlError, match="not in scene"):
        sim.reset("aloha_reach_cube", 1)


def test_client_times_out_and_recovers(short_tmp, ctx, world):
    endpoint = f"ipc://{short_tmp}/late"
    sim = SimControl(endpoint, timeout_s=0.2, ctx=ctx)
    with pytest.raises(TimeoutError, match="no answer to 'state' within 0.2 s"):
        sim.state()  # nobody bound yet
    server = SimControlServer(endpoint, world, ctx)
    pump = _Pump(server)
    try:
        assert sim.state()["task"] == world.task  # the REQ socket was reopened: it can send again
    finally:
        pump.stop()
        server.close()
        sim.close()


def test_oversized_request_is_dropped_unanswered(served, ctx):
    _, endpoint = served
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb({"cmd": "state", "pad": "x" * 10000}))
        assert not sock.poll(300)  # zmq's MAXMSGSIZE drops the connection: no reply, no crash
    finally:
        sock.close(0)
    with SimControl(endpoint, timeout_s=2.0, ctx=ctx) as sim:
        assert sim.state()["task"] in ("reach_cube", "press_button")  # the server still answers others


def test_a_client_that_floods_and_never_reads_cannot_stall_the_poll(world, short_tmp, ctx):
    """The server is polled from the driver's control tick: answering must never wait on a client."""
    import contextlib
    import time

    endpoint = f"ipc://{short_tmp}/sim"
    server = SimControlServer(endpoint, world, ctx)
    flood = ctx.socket(zmq.DEALER)
    flood.setsockopt(zmq.LINGER, 0)
    flood.setsockopt(zmq.RCVHWM, 1)  # it never reads: its queue fills at once
    flood.connect(endpoint)
    try:
        request = [b"", msgpack.packb({"cmd": "state"})]
        sent = 0
        with contextlib.suppress(zmq.Again):  # until the queues between us are full
            for _ in range(5000):
                flood.send_multipart(request, zmq.NOBLOCK)
                sent += 1
        assert sent > 100
        slowest, answered = 0.0, 0
        deadline = time.monotonic() + 5.0
        while answered < sent and time.monotonic() < deadline:
            started = time.monotonic()
            if server.poll():
                answered += 1
            slowest = max(slowest, time.monotonic() - started)
        assert answered == sent, f"only {answered} of {sent} requests were taken"
        assert slowest < 0.05, f"one poll took {slowest * 1e3:.0f} ms"
        flood.send_multipart([b"only one frame"], zmq.NOBLOCK)  # not a REQ envelope: ignored
        assert server.poll() is False
        pump = _Pump(server)
        try:
            with SimControl(endpoint, timeout_s=2.0, ctx=ctx) as sim:  # others are still answered
                assert sim.state()["task"] in ("reach_cube", "press_button")
        finally:
            pump.stop()
    finally:
        flood.close(0)
        server.close()


# --------------------------------------------------------------------------- the backend

from armada.drivers.core.backend import BackendError  # noqa: E402
from armada.drivers.sim.backend import MujocoBackend  # noqa: E402
from armada.drivers.sim.plugin import PLUGIN, MujocoBackendConfig, check_embodiment  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

SO101 = load_embodiment("so101")


def _backend(control: str | None = None, task: str = "reach_cube", seed: int = 3) -> MujocoBackend:
    b = MujocoBackend("so101", task, seed, control, home=SO101.home, period_s=1.0 / SO101.control_rate_hz,
                      lower=SO101.lower, upper=SO101.upper)
    b.connect(5.0)
    return b


def test_config_and_embodiment_checks():
    cfg = MujocoBackendConfig(scene="so101", task="press_button", control="ipc://{run_dir}/sim-robot")
    assert cfg.seed == 0 and PLUGIN.kind == "mujoco" and PLUGIN.moves_hardware is False
    with pytest.raises(ValueError, match="task 'aloha_reach_cube' is not in scene 'so101'"):
        MujocoBackendConfig(scene="so101", task="aloha_reach_cube")
    with pytest.raises(ValueError, match="scheme|tcp"):
        MujocoBackendConfig(scene="so101", task="reach_cube", control="tcp://0.0.0.0:5555")
    with pytest.raises(ValueError, match="extra|forbid"):
        MujocoBackendConfig(scene="so101", task="reach_cube", speed=2)
    check_embodiment(cfg, SO101)
    with pytest.raises(ValueError, match="sim scene 'aloha' needs the joints .*embodiment 'so101'"):
        check_embodiment(MujocoBackendConfig(scene="aloha", task="aloha_reach_cube"), SO101)


def test_starts_at_home_and_steps_one_period_per_read():
    b = _backend()
    first = b.read()
    assert np.allclose(first.position, SO101.home, atol=1e-9)
    sim = first.extras["sim"]
    assert sim["time_s"] == 0.0 and sim["task"] == "reach_cube" and sim["seed"] == 3 and sim["success"] is False
    assert len(sim["qpos"]) == b.world.model.nq and sim["resets"] == 1
    for k in range(1, 4):
        assert b.read().extras["sim"]["time_s"] == pytest.approx(0.02 * k)
    b.close()


def test_write_moves_the_arm_and_estop_holds_and_ignores_writes():
    b = _backend()
    b.read()
    goal = SO101.home + np.array([1.0, -0.3, 0.3, 0.2, 0.0, 0.3])
    b.write(goal)
    for _ in range(2):
        b.read()
    moving = b.read().position
    assert moving[0] > 0.02  # on its way
    b.estop()  # holds where the arm was measured last (the physics does not step between)
    b.write(SO101.home)  # ignored while e-stopped
    writes = b.writes
    for _ in range(50):
        after = b.read().position
    assert b.writes == writes
    assert np.allclose(after, moving, atol=0.01)  # settles where it was stopped, not at the goal or home
    assert abs(after[0] - goal[0]) > 0.3
    b.release_estop()
    b.write(goal)
    for _ in range(100):
        final = b.read().position
    assert np.allclose(final, goal, atol=0.02)
    b.on_fault("test")  # a fault holds the same way, until recover
    b.write(SO101.home)
    assert b.writes == writes + 1
    b.recover(1.0)
    b.write(SO101.home)
    assert b.writes == writes + 2
    b.close()


def test_control_socket_is_polled_by_read(short_tmp):
    import threading

    endpoint = f"ipc://{short_tmp}/sim-robot"
    b = _backend(control=endpoint)
    b.read()
    replies: dict[str, object] = {}

    def client() -> None:
        with SimControl(endpoint, timeout_s=3.0) as sim:
            replies["objects"] = sim.reset("press_button", 12)
            replies["state"] = sim.state()
            try:
                sim.reset("nope", 1)
            except SimControlError as exc:
                replies["error"] = str(exc)

    t = threading.Thread(target=client)
    t.start()
    for _ in range(500):  # each read answers at most one request
        reading = b.read()
        if not t.is_alive():
            break
    t.join(timeout=3)
    assert list(replies["objects"]) == ["button"]
    assert replies["state"]["task"] == "press_button" and replies["state"]["seed"] == 12
    assert "not in scene 'so101'" in replies["error"]
    sim = b.read().extras["sim"]
    assert (sim["task"], sim["seed"], sim["resets"]) == ("press_button", 12, 2)  # the bad reset changed nothing
    assert reading.extras["sim"]["task"] == "press_button"
    b.close()
    assert not (short_tmp / "sim-robot").exists()  # the socket file goes with the backend


def test_unconnected_backend_refuses_clearly():
    b = MujocoBackend("so101", "reach_cube", 0, None, SO101.home, 0.02, SO101.lower, SO101.upper)
    with pytest.raises(BackendError, match="not connected"):
        b.read()
