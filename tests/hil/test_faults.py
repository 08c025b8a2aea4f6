"""Fault injection against real processes: kill -9, garbage, NaN, lease fights, e-stop, restart."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import numpy as np
import pytest
import zmq

from armada.runtime import protocol
from armada.runtime.config import SCRIPTED_CELL, load_embodiment
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import CommandClient, RemoteError
from tests.hil.helpers import StateRecorder, commanded_kinematics

pytestmark = pytest.mark.hil


@pytest.fixture
def driver_only(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        yield procs


def _client(procs) -> CommandClient:
    return CommandClient(procs.ctx, procs.cell.drivers[0].cmd, default_timeout_s=1.0)


def _raw_request(procs, raw: bytes, timeout_s: float = 1.0) -> dict:
    """Send arbitrary bytes on the command socket and return the decoded reply."""
    sock = procs.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(procs.cell.drivers[0].cmd)
    try:
        sock.send(raw)
        assert sock.poll(int(timeout_s * 1000)), "no reply to a malformed message"
        return protocol.decode(sock.recv())
    finally:
        sock.close()


def test_kill_inference_mid_episode_driver_decelerates_to_a_hold(short_tmp):
    emb = load_embodiment("mock_arm")
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        client = EpisodeClient(procs.ctx, procs.cell)
        client.start("wave", duration_s=20.0, arm=True)
        rec.wait_mode("running", 5.0)
        time.sleep(1.5)  # mid-motion
        infer = procs.child("infer")
        os.kill(infer.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic_ns()
        held = rec.wait_mode("armed", 2.0)
        time.sleep(0.5)
        states = rec.stop()
        client.close()

    ttl = procs.cell.drivers[0].lease_ttl_s
    # The watchdog (lease) fires within its ttl plus a little scheduling slack.
    assert (held["mono_ns"] - killed_at) * 1e-9 < ttl + 0.15
    t, q, v = commanded_kinematics(states)
    assert np.all(np.abs(v) <= emb.max_velocity * (1 + 1e-9))
    dv = np.abs(np.diff(v, axis=0))
    dt = 1.0 / emb.control_rate_hz
    assert np.all(dv <= emb.max_acceleration * dt * (1 + 1e-6) + 1e-12)
    # Then it holds still: zero commanded velocity, and armed (torque on), not idle.
    tail = [m for m in states if m["mono_ns"] > held["mono_ns"] + int(0.3e9)]
    assert tail and all(m["mode"] == "armed" for m in tail)
    assert np.allclose(np.stack([m["velocity"] for m in tail]), 0.0)
    assert tail[-1]["counters"]["lease_lost"] >= 1


@pytest.mark.parametrize("raw, code", [
    (b"\xc1\xff garbage", "bad_encoding"),
    (msgpack.packb([1, 2, 3]), "bad_encoding"),
    (msgpack.packb({"v": 1, "kind": "warp_drive", "seq": 1, "t_ns": 0}), "unknown_kind"),
    (msgpack.packb({"v": 9, "kind": "ping", "seq": 1, "t_ns": 0}), "version_mismatch"),
    (msgpack.packb({"v": 1, "kind": "move_to", "seq": 1, "t_ns": 0}), "missing_field"),
])
def test_malformed_messages_get_error_replies_and_the_driver_stays_up(driver_only, raw, code):
    reply = _raw_request(driver_only, raw)
    assert reply["kind"] == "reply" and reply["ok"] is False
    assert reply["code"] == code, reply
    client = _client(driver_only)
    assert client.request("ping")["mode"] == "idle"
    client.close()


def test_a_message_over_the_size_limit_is_dropped_unread_and_the_driver_stays_up(driver_only):
    # ZeroMQ drops the connection at MAXMSGSIZE before buffering it: no reply, nothing decoded.
    sock = driver_only.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(driver_only.cell.drivers[0].cmd)
    try:
        sock.send(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1))
        assert not sock.poll(500)
    finally:
        sock.close()
    client = _client(driver_only)
    assert client.request("ping")["mode"] == "idle"
    client.close()


def test_nan_and_wrong_shape_targets_are_refused_and_change_nothing(driver_only):
    client = _client(driver_only)
    rec = StateRecorder(driver_only.ctx, driver_only.cell.drivers[0].state)
    lease = client.request("acquire", client="test")["lease"]
    client.request("arm", lease=lease)
    before = rec.wait_mode("armed", 2.0)["commanded"].copy()
    bad = np.full((10, 7), np.nan)
    now = client.request("ping")["mono_ns"]
    with pytest.raises(RemoteError) as err:
        client.request("trajectory", lease=lease, t0_ns=now, dt=0.02, points=bad)
    assert err.value.code == "non_finite"
    with pytest.raises(RemoteError) as err:
        client.request("trajectory", lease=lease, t0_ns=now, dt=0.02, points=np.zeros((10, 3)))
    assert err.value.code == "bad_shape"
    with pytest.raises(RemoteError) as err:
        client.request("move_to", lease=lease, target=np.array([np.inf] * 7))
    assert err.value.code == "non_finite"
    time.sleep(0.1)
    after = rec.stop()[-1]
    assert after["mode"] == "armed"
    assert np.allclose(after["commanded"], before)
    assert after["counters"]["rejected_messages"] >= 2
    client.close()


def test_a_far_first_target_is_refused_move_to_ramps_instead(driver_only):
    emb = load_embodiment("mock_arm")
    client = _client(driver_only)
    rec = StateRecorder(driver_only.ctx, driver_only.cell.drivers[0].state)
    lease = client.request("acquire", client="test")["lease"]
    client.request("arm", lease=lease)
    home = rec.wait_mode("armed", 2.0)["commanded"].copy()
    goal = home.copy()
    goal[0] += 1.0
    now = client.request("ping")["mono_ns"]
    with pytest.raises(RemoteError) as err:
        client.request("trajectory", lease=lease, t0_ns=now, dt=0.02, points=np.stack([goal] * 5))
    assert err.value.code == "too_far"
    duration = client.request("move_to", lease=lease, target=goal)["duration_s"]
    assert duration > 1.0 / (emb.max_velocity[0] * emb.move_to_velocity_fraction) * 0.99
    client.request("heartbeat", lease=lease)
    deadline = time.monotonic() + duration + 2
    while time.monotonic() < deadline:
        client.request("heartbeat", lease=lease)
        time.sleep(0.1)
        if rec.latest()["mode"] == "armed" and abs(rec.latest()["commanded"][0] - goal[0]) < 1e-9:
            break
    states = rec.stop()
    assert abs(states[-1]["commanded"][0] - goal[0]) < 1e-9
    v = np.stack([m["velocity"] for m in states])
    # The ramp's cap is a soft fraction of the limit: cubic interpolation may round its corners a
    # hair above it, and after an overrun (a skipped tick) the filter catches up a little faster.
    # The hard limit is the filter's and holds on every tick.
    cap = emb.max_velocity[0] * emb.move_to_velocity_fraction
    over_cap = int(np.sum(np.abs(v[:, 0]) > cap * 1.01))
    overruns = states[-1]["counters"]["overruns"] - states[0]["counters"]["overruns"]
    # Catching up one skipped tick takes the braking-curve law about 20 ticks.
    assert over_cap <= 0.01 * len(v) + 30 * overruns, (over_cap, overruns, len(v))
    assert np.all(np.abs(v) <= emb.max_velocity * (1 + 1e-9))
    client.close()


def test_second_client_without_the_lease_is_refused(driver_only):
    a, b = _client(driver_only), _client(driver_only)
    lease = a.request("acquire", client="policy")["lease"]
    with pytest.raises(RemoteError) as err:
        b.request("acquire", client="teleop")
    assert err.value.code == "lease_held" and "policy" in err.value.reason
    with pytest.raises(RemoteError) as err:
        b.request("arm", lease="not-the-token")
    assert err.value.code == "no_lease"
    a.request("arm", lease=lease)
    a.request("release", lease=lease)
    assert b.request("acquire", client="teleop")["lease"] != lease
    a.close()
    b.close()


def test_estop_latches_until_reset_and_reset_leaves_it_disarmed(driver_only):
    client = _client(driver_only)
    lease = client.request("acquire", client="op", ttl_s=5.0)["lease"]
    client.request("arm", lease=lease)
    other = _client(driver_only)
    assert other.request("estop", reason="test")["mode"] == "estop"  # anyone may press it
    for kind, fields in [("arm", {}), ("move_to", {"target": np.zeros(7)}), ("disarm", {})]:
        try:
            client.request(kind, lease=lease, **fields)
        except RemoteError:
            pass
        assert client.request("ping")["mode"] == "estop", kind
    for _ in range(10):  # the latch holds; the lease (the cell's TTL, 0.3 s) is kept by heartbeats
        time.sleep(0.05)
        assert client.request("heartbeat", lease=lease)["mode"] == "estop"
    assert client.request("reset_estop", lease=lease)["mode"] == "idle"
    client.close()
    other.close()


def test_restarted_driver_comes_up_disarmed(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        client = _client(procs)
        lease = client.request("acquire", client="op", ttl_s=5.0)["lease"]
        assert client.request("arm", lease=lease)["mode"] == "armed"
        child = procs.child("arm")
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(5)
        procs.children.remove(child)
        client.close()
        procs.spawn("driver", "arm")
        procs.wait_ready()
        client = _client(procs)
        hello = client.request("hello", version=PROTOCOL_VERSION, role="test")
        assert hello["mode"] == "idle"
        with pytest.raises(RemoteError) as err:
            client.request("heartbeat", lease=lease)  # the old lease died with the old process
        assert err.value.code == "no_lease"
        client.close()


def test_client_with_another_major_version_is_refused(driver_only):
    client = _client(driver_only)
    with pytest.raises(RemoteError) as err:
        client.request("hello", version="2.0", role="test")
    assert err.value.code == "version_mismatch"
    client.close()


def test_requests_to_a_dead_driver_time_out_instead_of_hanging(short_tmp, ctx):
    client = CommandClient(ctx, f"ipc://{short_tmp}/nobody-home", default_timeout_s=0.2)
    t = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("ping")
    assert time.monotonic() - t < 1.0
    client.close()


def test_a_killed_driver_is_named_by_the_supervisor_and_its_socket_files_removed(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        child = procs.child("arm")
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait(5)
        assert [why for _, why in procs.dead()] == ["driver arm died (killed by SIGKILL)"]
        assert (short_tmp / "arm-cmd").is_socket()  # kill -9: the driver could not clean up
        procs.stop()
        assert not (short_tmp / "arm-cmd").exists() and not (short_tmp / "arm-state").exists()
        assert not (short_tmp / "driver-arm.lock").exists()


def test_the_supervisor_stops_a_stopped_driver_gracefully_not_with_sigkill(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        child = procs.spawn("driver", "arm")
        procs.wait_ready()
        os.kill(child.proc.pid, signal.SIGSTOP)  # e.g. a debugger, or Ctrl-Z on the driver alone
        procs.stop(timeout_s=3.0)
        assert child.proc.returncode == 0  # its SIGTERM path ran: the arm held; not SIGKILL (-9)
