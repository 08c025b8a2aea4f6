"""Transport bounds (issue 9): replies always encode, ZeroMQ drops oversize messages before they
are buffered, drains are bounded under a flood, ipc socket files are owner-only and removed on
close, CURVE secret keys must be private and refused clients are logged."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from armada.runtime import protocol
from armada.runtime.config import CurveConfig
from armada.runtime.protocol import COMMAND_LIMITS, MAX_REASON_CHARS, MessageFactory
from armada.runtime.transport import (
    DRAIN_BUDGET_S,
    DRAIN_SLACK,
    CommandClient,
    CommandServer,
    FramePublisher,
    FrameSubscriber,
    Publisher,
    Subscriber,
    start_authenticator,
)
from tests.unit.test_transport import _ep, _join, _join_frames, _serve

# --------------------------------------------------------------------------- replies always encode


def test_a_reply_too_large_to_encode_becomes_a_too_large_error_reply(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, blob=b"x" * (protocol.MAX_MESSAGE_BYTES + 1)))
    with pytest.raises(Exception) as info:
        client.request("ping", timeout_s=2.0)
    thread.join(2)
    assert getattr(info.value, "code", None) == "too_large", info.value
    # The serving side is still fine: the next request gets its answer.
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, pong=True))
    assert client.request("ping", timeout_s=2.0) == {"pong": True}
    thread.join(2)


def test_a_reply_of_no_wire_type_becomes_an_internal_error_reply(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, thing=object()))
    with pytest.raises(Exception) as info:
        client.request("ping", timeout_s=2.0)
    thread.join(2)
    assert getattr(info.value, "code", None) == "internal", info.value


def test_an_error_reply_with_a_huge_reason_is_sent_cut(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.reply_error(req, protocol.ErrorCode.INTERNAL, "why " * 2_000_000))
    with pytest.raises(Exception) as info:
        client.request("ping", timeout_s=2.0)
    thread.join(2)
    assert info.value.code == "internal" and len(info.value.reason) <= MAX_REASON_CHARS


def _raw_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_the_megabyte_bytes_key_message_does_not_stop_the_server(ctx, short_tmp):
    # The message of the issue: its error reply once raised in the serving thread and killed it.
    # Now ZeroMQ drops it (over the command size limit); if it came through it would get a short
    # error. Either way the server answers the next client.
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    attacker = _raw_dealer(ctx, _ep(short_tmp, "cmd"))
    attacker.send(b"\x81" + msgpack.packb(b"k" * 1_200_000, use_bin_type=True) + b"\xc0")
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, pong=1), timeout_s=3.0)
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    assert client.request("ping", timeout_s=2.0) == {"pong": 1}
    thread.join(2)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- maximum message size


def _wait_event(monitor: zmq.Socket, event: int, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(50):
            if recv_monitor_message(monitor)["event"] == event:
                return True
    return False


@pytest.mark.parametrize("size", [COMMAND_LIMITS.max_bytes + 1, 8 * 1024 * 1024])
def test_zeromq_drops_an_oversize_command_and_its_connection(ctx, short_tmp, size):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    monitor = server.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
    try:
        attacker = _raw_dealer(ctx, _ep(short_tmp, "cmd"))
        assert _wait_event(monitor, zmq.EVENT_ACCEPTED)
        attacker.send(b"\xc0" * size)
        assert _wait_event(monitor, zmq.EVENT_DISCONNECTED), "the oversize sender was not disconnected"
        assert not server.poll(0.2) and server.counters.received == 0  # never buffered, never decoded
        # A message at the limit still arrives (and is judged by the decoder).
        client = CommandClient(ctx, _ep(short_tmp, "cmd"))
        thread = _serve(server, lambda srv, req: srv.reply_ok(req, pong=2))
        assert client.request("ping", timeout_s=2.0) == {"pong": 2}
        thread.join(2)
    finally:
        server.socket.disable_monitor()
        monitor.close(0)


def test_a_subscriber_drops_an_oversize_stream_message(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    received = sub.counters.received
    pub.send_raw(b"\xc0" * (sub.limits.max_bytes + 1))
    assert sub.recv(0.3) is None
    assert sub.counters.received == received


def test_a_publisher_refuses_what_its_subscribers_would_drop(ctx, short_tmp):
    # libzmq does not reconnect after dropping an oversize message: one would cut every
    # subscriber off for good, so the sender refuses it.
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    with pytest.raises(protocol.ProtocolError) as info:
        pub.publish("event", event="big", data={"blob": b"x" * pub.max_bytes})
    assert info.value.code is protocol.ErrorCode.TOO_LARGE
    _join(pub, sub)  # the subscriber is still connected


def test_every_socket_sets_a_maximum_message_size(ctx, short_tmp):
    sockets = [Publisher(ctx, _ep(short_tmp, "a")).socket, Subscriber(ctx, _ep(short_tmp, "a")).socket,
               CommandServer(ctx, _ep(short_tmp, "b")).socket, CommandClient(ctx, _ep(short_tmp, "b")).socket,
               FramePublisher(ctx, _ep(short_tmp, "c")).socket, FrameSubscriber(ctx, _ep(short_tmp, "c")).socket]
    sizes = [s.getsockopt(zmq.MAXMSGSIZE) for s in sockets]
    assert all(size > 0 for size in sizes), sizes
    assert sizes[2] == COMMAND_LIMITS.max_bytes and sizes[2] < sizes[1] < sizes[5]
    # What one flooding connection can make a command server hold is bounded too.
    assert sockets[2].getsockopt(zmq.RCVHWM) * sizes[2] <= 8 * 1024 * 1024


# --------------------------------------------------------------------------- peeking at the kind


def test_a_raw_request_shows_its_kind_before_it_is_decoded(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _raw_dealer(ctx, _ep(short_tmp, "cmd"))
    f = MessageFactory()
    dealer.send(protocol.encode(f.make("trajectory", lease="x", t0_ns=1, dt=0.01, points=np.zeros((3, 2)))))
    dealer.send(protocol.encode(f.make("estop", reason="operator")))
    dealer.send_multipart([b"a", b"b"])
    assert server.poll(2.0)
    got = []
    deadline = time.monotonic() + 2.0
    while len(got) < 3 and time.monotonic() < deadline:
        raw = server.recv_raw()
        if raw is not None:
            got.append(raw)
    assert [r.kind for r in got] == ["trajectory", "estop", None]
    req = server.parse(got[1])
    assert req.msg["kind"] == "estop" and req.error is None
    assert server.parse(got[2]).error.code is protocol.ErrorCode.BAD_ENCODING


# --------------------------------------------------------------------------- bounded drains


class _Flood:
    """Publishes as fast as it can from another thread until stopped."""

    def __init__(self, pub: Publisher, raw: bytes):
        self.pub, self.raw, self.stop = pub, raw, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for _ in range(200):
                self.pub.send_raw(self.raw)

    def __enter__(self) -> _Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def _returns_within(fn, timeout_s: float) -> tuple[bool, object]:
    """Run ``fn`` in a thread; (whether it returned in time, its result)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive(), (out[0] if out else None)


@pytest.mark.parametrize("method", ["recv_latest", "drain"])
def test_drains_return_under_a_flood(ctx, short_tmp, method):
    pub = Publisher(ctx, _ep(short_tmp, "state"), hwm=100_000)
    sub = Subscriber(ctx, _ep(short_tmp, "state"), hwm=100_000)
    _join(pub, sub)
    raw = protocol.encode(pub.factory.make("event", event="flood", data={"i": 1}))
    with _Flood(pub, raw):
        time.sleep(0.2)  # let a backlog build
        returned, result = _returns_within(getattr(sub, method), 2.0)
    assert returned, f"{method} kept reading while the flood went on"
    if method == "drain":
        assert 0 < len(result) <= sub.max_drain
    else:
        assert result is not None and result["event"] == "flood"


def test_a_drain_reads_at_most_the_high_water_mark_plus_slack(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"), hwm=10_000)
    sub = Subscriber(ctx, _ep(short_tmp, "state"), hwm=50)
    _join(pub, sub)
    for i in range(2000):
        pub.publish("event", event="n", data={"i": i})
    time.sleep(0.3)
    first = sub.drain()
    assert 0 < len(first) <= 50 + DRAIN_SLACK
    assert sub.recv(1.0) is not None, "what one call left stays queued for the next"


def test_a_drain_stops_at_its_time_budget(ctx, short_tmp, monkeypatch):
    pub = Publisher(ctx, _ep(short_tmp, "state"), hwm=10_000)
    sub = Subscriber(ctx, _ep(short_tmp, "state"), hwm=10_000)
    _join(pub, sub)
    for i in range(500):
        pub.publish("event", event="n", data={"i": i})
    time.sleep(0.3)
    slow_read = sub._read

    def read() -> dict | None:  # a slow decoder: each message costs a tenth of the budget
        time.sleep(DRAIN_BUDGET_S / 10)
        return slow_read()

    monkeypatch.setattr(sub, "_read", read)
    start = time.monotonic()
    got = sub.drain()
    # About ten reads fit the budget; all 500 would take 2.5 s. Generous for a loaded machine.
    assert time.monotonic() - start < 1.0
    assert 1 <= len(got) <= 12


def test_frame_recv_latest_returns_under_a_flood(ctx, short_tmp):
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"), hwm=100_000)
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"), hwm=100_000)
    _join_frames(pub, sub)
    pixels = np.zeros((2, 2, 3), np.uint8)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            for _ in range(100):
                pub.send(pixels, camera="probe", frame_seq=1, capture_ns=1)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        returned, frame = _returns_within(sub.recv_latest, 2.0)
    finally:
        stop.set()
        thread.join(5)
    assert returned and frame is not None


# --------------------------------------------------------------------------- ipc socket files


def test_ipc_socket_files_are_owner_only_whatever_the_umask(ctx, short_tmp):
    old = os.umask(0)
    try:
        servers = [Publisher(ctx, _ep(short_tmp, "pub")), CommandServer(ctx, _ep(short_tmp, "cmd")),
                   FramePublisher(ctx, _ep(short_tmp, "cam"))]
    finally:
        os.umask(old)
    for name in ("pub", "cmd", "cam"):
        mode = (short_tmp / name).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, (name, oct(mode))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))  # the owner still connects
    thread = _serve(servers[1], lambda srv, req: srv.reply_ok(req))
    assert client.request("ping", timeout_s=2.0) == {}
    thread.join(2)
    for server in servers:
        server.close()
    assert not any((short_tmp / n).exists() for n in ("pub", "cmd", "cam")), "socket files left behind"


def test_close_leaves_a_socket_file_that_is_no_longer_ours(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    path = short_tmp / "cmd"
    path.unlink()  # another process took the path over since: its socket must survive our close
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(path))
    try:
        server.close()
        assert path.exists()
    finally:
        other.close()


def test_abstract_ipc_sockets_are_never_bound(ctx):
    with pytest.raises(OSError, match="abstract"):
        CommandServer(ctx, "ipc://@armada-test-abstract")


# --------------------------------------------------------------------------- CURVE


@pytest.fixture
def curve_keys(tmp_path):
    if not zmq.has("curve"):
        pytest.skip("libzmq built without CURVE")
    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, stranger_secret = zmq.auth.create_certificates(keys, "stranger")
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    shutil.copy(client_public, allowed / "client.key")
    for secret in (server_secret, client_secret, stranger_secret):
        Path(secret).chmod(0o600)
    common = {"server_public_key": Path(server_public), "authorized_clients": allowed}
    return {"server": CurveConfig(server_secret_key=Path(server_secret), **common),
            "client": CurveConfig(client_secret_key=Path(client_secret), **common),
            "stranger": CurveConfig(client_secret_key=Path(stranger_secret), **common)}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize("side", ["server", "client"])
def test_a_secret_key_readable_by_others_is_refused_naming_the_file_and_the_fix(ctx, curve_keys, mode, side):
    curve = curve_keys[side]
    secret = curve.server_secret_key if side == "server" else curve.client_secret_key
    secret.chmod(mode)
    with pytest.raises(ValueError) as info:
        if side == "server":
            CommandServer(ctx, "tcp://127.0.0.1:*", curve=curve)
        else:
            CommandClient(ctx, "tcp://127.0.0.1:5999", curve=curve)
    assert str(secret) in str(info.value) and f"chmod 600 {secret}" in str(info.value)


def test_a_refused_curve_client_is_logged(ctx, curve_keys, caplog):
    caplog.set_level(logging.WARNING, logger="armada.runtime.transport")
    auth = start_authenticator(ctx, curve_keys["server"])
    try:
        server = CommandServer(ctx, "tcp://127.0.0.1:*", curve=curve_keys["server"])
        endpoint = server.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        stranger = CommandClient(ctx, endpoint, curve=curve_keys["stranger"])
        with pytest.raises(TimeoutError):
            stranger.request("ping", timeout_s=0.5)
        stranger_public = zmq.auth.load_certificate(curve_keys["stranger"].client_secret_key)[0].decode()
        refusals = [r for r in caplog.records if r.levelno == logging.WARNING and stranger_public in r.getMessage()]
        assert refusals, [r.getMessage() for r in caplog.records]
        assert str(curve_keys["server"].authorized_clients) in refusals[0].getMessage()
        # The authorized client still gets in, and is not logged as refused.
        friend = CommandClient(ctx, endpoint, curve=curve_keys["client"])
        thread = _serve(server, lambda srv, req: srv.reply_ok(req, ok=1))
        assert friend.request("ping", timeout_s=2.0) == {"ok": 1}
        thread.join(2)
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == len(refusals)
    finally:
        auth.stop()
