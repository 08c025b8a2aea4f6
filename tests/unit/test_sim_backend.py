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
