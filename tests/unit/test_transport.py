"""Transport: endpoint policy, request/reply with timeouts, validated streams, frames, CURVE.

Every socket here is in-process (ipc:// in a short temp folder, or loopback tcp:// for CURVE);
each test takes well under a second.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml
import zmq
import zmq.auth

from armada.runtime import protocol
from armada.runtime.config import DEFAULT_CELL, ConfigError, CurveConfig, load_cell
from armada.runtime.protocol import PROTOCOL_MAJOR, ErrorCode
from armada.runtime.transport import (
    CommandClient,
    CommandServer,
    FramePublisher,
    FrameSubscriber,
    Publisher,
    RemoteError,
    Request,
    Subscriber,
    check_endpoint,
    start_authenticator,
)

FRAME_H, FRAME_W = 480, 640


# --------------------------------------------------------------------------- helpers


def _ep(short_tmp: Path, name: str) -> str:
    return f"ipc://{short_tmp}/{name}"


def _serve(server: CommandServer, handler, count: int = 1, timeout_s: float = 3.0) -> threading.Thread:
    """Answer ``count`` requests in a thread; ``handler(server, req)`` sends the reply."""

    def run() -> None:
        deadline = time.monotonic() + timeout_s
        served = 0
        while served < count and time.monotonic() < deadline:
            if not server.poll(0.05):
                continue
            req = server.recv()
            if req is not None:
                handler(server, req)
                served += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _recv_request(server: CommandServer, timeout_s: float = 2.0) -> Request:
    assert server.poll(timeout_s), "the server received nothing"
    req = server.recv()
    assert req is not None
    return req


def _dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _recv_reply(sock: zmq.Socket, timeout_s: float = 2.0) -> dict:
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return protocol.decode_valid(sock.recv())


def _join(pub: Publisher, sub: Subscriber, timeout_s: float = 2.0) -> None:
    """Wait out the PUB/SUB slow-joiner window: publish probes until one arrives, then drain."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.publish("event", event="probe")
        if sub.recv(0.02) is not None:
            time.sleep(0.02)
            sub.drain()
            return
    raise AssertionError("subscriber never connected")


def _frame_header(**over) -> dict:
    header = {"camera": "front", "frame_seq": 1, "capture_ns": 123, "width": FRAME_W, "height": FRAME_H,
              "channels": 3, "dtype": "uint8", "encoding": "raw"}
    return header | over


def _join_frames(pub: FramePublisher, sub: FrameSubscriber, timeout_s: float = 2.0) -> None:
    probe = np.zeros((2, 2, 3), np.uint8)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.send(probe, **_frame_header(camera="probe", width=2, height=2))
        if sub.recv(0.02) is not None:
            time.sleep(0.02)
            while sub.recv_latest() is not None:
                pass
            return
    raise AssertionError("frame subscriber never connected")


def _smooth_image() -> np.ndarray:
    """A smooth RGB gradient, different in every channel (so a channel swap would show)."""
    y, x = np.mgrid[0:FRAME_H, 0:FRAME_W].astype(np.float64)
    r = 255 * x / (FRAME_W - 1)
    g = 255 * y / (FRAME_H - 1)
    b = 128 + 100 * np.sin(2 * np.pi * x / FRAME_W) * np.cos(2 * np.pi * y / FRAME_H)
    return np.ascontiguousarray(np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- check_endpoint


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/armada/arm-cmd", "inproc://arm-cmd"])
def test_check_endpoint_accepts_local_endpoints(endpoint):
    check_endpoint(endpoint)
    check_endpoint(endpoint, curve=True)


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5555",
    "tcp://127.0.0.2:5555",
    "tcp://localhost:5555",
    "tcp://[::1]:5555",
])
def test_plain_loopback_tcp_needs_the_cells_opt_in(endpoint):
    # Every local user can connect to it: at umask 000 another user took the lease and moved the arm.
    with pytest.raises(ValueError) as info:
        check_endpoint(endpoint)
    for fix in ("ipc://", "curve", "plain_tcp_loopback: true"):  # the error says how to fix it
        assert fix in str(info.value)
    check_endpoint(endpoint, plain_tcp_loopback=True)
    check_endpoint(endpoint, curve=True)


@pytest.mark.parametrize("endpoint", ["ipc://@armada-arm-cmd", "ipc://@"])
def test_abstract_ipc_sockets_are_refused(endpoint):
    with pytest.raises(ValueError, match="abstract"):
        check_endpoint(endpoint, curve=True, plain_tcp_loopback=True)


@pytest.mark.parametrize("endpoint", [
    "tcp://10.0.0.5:5555",
    "tcp://192.168.1.2:5555",
    "tcp://robot-arm.local:5555",
    "tcp://0.0.0.0:5555",
    "tcp://*:5555",
])
def test_check_endpoint_refuses_plain_tcp_between_hosts_and_accepts_it_with_curve(endpoint):
    with pytest.raises(ValueError, match="curve"):
        check_endpoint(endpoint)
    check_endpoint(endpoint, curve=True)


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1",
    "tcp://[::1]",
    "tcp://localhost",
    "tcp://:5555",
    "tcp://127.0.0.1:99999",
])
@pytest.mark.parametrize("curve", [False, True])
def test_check_endpoint_refuses_tcp_without_a_valid_host_and_port(endpoint, curve):
    with pytest.raises(ValueError):
        check_endpoint(endpoint, curve=curve)


@pytest.mark.parametrize("endpoint", [
    "udp://127.0.0.1:5555", "pgm://eth0;239.192.1.1:5555", "http://localhost:80", "127.0.0.1:5555",
    "ipc://", "inproc://",
])
def test_check_endpoint_refuses_unknown_schemes_and_empty_paths(endpoint):
    with pytest.raises(ValueError):
        check_endpoint(endpoint, curve=True)


def _write_cell(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(DEFAULT_CELL.read_text())
    mutate(data)
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_cell_refuses_plain_tcp_to_another_host_naming_the_key(tmp_path):
    def mutate(data):
        data["drivers"][0]["cmd"] = "tcp://10.0.0.5:6000"

    path = _write_cell(tmp_path, mutate)
    with pytest.raises(ConfigError) as info:
        load_cell(path, tmp_path)
    err = info.value
    assert err.key == "drivers.0.cmd"
    assert err.file == str(path)
    assert "curve" in err.reason and "10.0.0.5" in err.reason
    assert "drivers.0.cmd" in str(err) and str(path) in str(err)


def test_load_cell_names_the_camera_key_too(tmp_path):
    def mutate(data):
        data["cameras"][1]["frames"] = "tcp://192.168.1.2:6001"

    with pytest.raises(ConfigError) as info:
        load_cell(_write_cell(tmp_path, mutate), tmp_path)
    assert info.value.key == "cameras.1.frames"


def test_load_cell_accepts_tcp_between_hosts_with_curve_and_loopback_without(tmp_path):
    def with_curve(data):
        data["drivers"][0]["cmd"] = "tcp://10.0.0.5:6000"
        data["curve"] = {"server_public_key": str(tmp_path / "server.key"),
                         "authorized_clients": str(tmp_path / "clients")}

    cell = load_cell(_write_cell(tmp_path, with_curve), tmp_path)
    assert cell.drivers[0].cmd == "tcp://10.0.0.5:6000" and cell.curve is not None

    def loopback(data):
        data["drivers"][0]["cmd"] = "tcp://127.0.0.1:6000"

    with pytest.raises(ConfigError) as info:
        load_cell(_write_cell(tmp_path, loopback), tmp_path)
    assert info.value.key == "drivers.0.cmd" and "plain_tcp_loopback" in info.value.reason

    def opted_in(data):
        loopback(data)
        data["plain_tcp_loopback"] = True

    cell = load_cell(_write_cell(tmp_path, opted_in), tmp_path)
    assert cell.curve is None and cell.plain_tcp_loopback


# --------------------------------------------------------------------------- CommandServer / CommandClient


def test_request_reply_round_trip(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    seen: list[dict] = []

    def handler(srv, req):
        seen.append(req.msg)
        srv.reply_ok(req, echo=req.msg["client"], arr=np.arange(3.0))

    thread = _serve(server, handler)
    data = client.request("acquire", timeout_s=2.0, client="test", ttl_s=0.5)
    thread.join(2)
    assert data["echo"] == "test"
    np.testing.assert_array_equal(data["arr"], [0.0, 1.0, 2.0])
    assert seen[0]["kind"] == "acquire" and seen[0]["ttl_s"] == 0.5
    assert server.counters.received == 1 and server.counters.rejected == 0


def test_request_times_out_when_nobody_answers(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))  # bound, but never answers
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="ping"):
        client.request("ping", timeout_s=0.3)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 0.5
    assert server.poll(0.5)  # the request did go out


def test_request_times_out_when_no_server_is_bound(ctx, short_tmp):
    client = CommandClient(ctx, _ep(short_tmp, "nobody"), default_timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("ping")
    assert time.monotonic() - t0 < 0.4


def test_late_reply_to_a_timed_out_request_is_discarded(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    with pytest.raises(TimeoutError):
        client.request("status", timeout_s=0.15)
    first = _recv_request(server)  # request 1, still unanswered

    seqs: list[int] = []

    def handler(srv, req):  # request 2 arrives: answer 1 (late), then 2
        seqs.append(req.msg["seq"])
        srv.reply_ok(first, which=1)
        time.sleep(0.05)  # make sure the stale reply is queued first
        srv.reply_ok(req, which=2)

    thread = _serve(server, handler)
    data = client.request("status", timeout_s=2.0)
    thread.join(2)
    assert data == {"which": 2}
    assert seqs and seqs[0] != first.msg["seq"]
    # Nothing more is waiting: the late reply was consumed and dropped, not left for the next call.
    assert not client.socket.poll(50)


def test_error_reply_raises_remote_error_with_code_and_reason(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.reply_error(req, ErrorCode.BAD_STATE, "driver is not armed"))
    with pytest.raises(RemoteError) as info:
        client.request("disarm", timeout_s=2.0, lease="abc")
    thread.join(2)
    assert info.value.code == "bad_state"
    assert info.value.reason == "driver is not armed"
    assert info.value.kind == "disarm"
    assert "bad_state" in str(info.value)


def test_garbage_reply_is_ignored_and_the_real_reply_still_arrives(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))

    def handler(srv, req):
        srv.socket.send_multipart([req.identity, b"\xc1\xc1 not msgpack"])
        srv.socket.send_multipart([req.identity, msgpack.packb([1, 2, 3])])  # valid msgpack, not a map
        bad_version = srv.factory.ok(req.msg, which="wrong") | {"v": PROTOCOL_MAJOR + 1}
        srv.socket.send_multipart([req.identity, protocol.encode(bad_version)])
        not_a_reply = srv.factory.make("event", event="x")
        srv.socket.send_multipart([req.identity, protocol.encode(not_a_reply)])
        srv.reply_ok(req, which="real")

    thread = _serve(server, handler)
    assert client.request("status", timeout_s=2.0) == {"which": "real"}
    thread.join(2)


def test_garbage_reply_alone_ends_in_timeout_not_a_crash(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.socket.send_multipart([req.identity, b"\x00garbage"]))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("status", timeout_s=0.3)
    assert time.monotonic() - t0 < 0.5
    thread.join(2)


# --------------------------------------------------------------------------- CommandServer.recv


def test_server_recv_returns_none_when_nothing_is_queued(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    assert server.recv() is None
    assert not server.poll(0.01)


def test_server_recv_garbage_bytes_gives_bad_encoding_and_reply_with_re_minus_one(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _dealer(ctx, _ep(short_tmp, "cmd"))
    dealer.send(b"\xc1\xc1\xc1 garbage")
    req = _recv_request(server)
    assert req.msg is None
    assert req.error is not None and req.error.code == ErrorCode.BAD_ENCODING
    assert req.raw_seq == -1
    assert server.counters.rejected == 1 and server.counters.by_code == {"bad_encoding": 1}
    server.reply_error(req, req.error.code, req.error.reason)
    reply = _recv_reply(dealer)
    assert reply["kind"] == "reply" and reply["ok"] is False
    assert reply["code"] == "bad_encoding" and reply["re"] == -1
    dealer.close()


def test_server_recv_multipart_message_gives_bad_encoding(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _dealer(ctx, _ep(short_tmp, "cmd"))
    ping = protocol.encode(MessageFactoryStub.make("ping", seq=5))
    dealer.send_multipart([ping, ping])
    req = _recv_request(server)
    assert req.msg is None and req.error.code == ErrorCode.BAD_ENCODING
    assert "part" in req.error.reason
    server.reply_error(req, req.error.code, req.error.reason)
    reply = _recv_reply(dealer)
    assert reply["code"] == "bad_encoding" and reply["re"] == -1
    dealer.close()


def test_server_recv_wrong_version_gives_version_mismatch_and_reply_names_the_seq(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _dealer(ctx, _ep(short_tmp, "cmd"))
    dealer.send(protocol.encode(MessageFactoryStub.make("ping", seq=41, v=PROTOCOL_MAJOR + 1)))
    req = _recv_request(server)
    assert req.msg is None and req.error.code == ErrorCode.VERSION_MISMATCH
    assert req.raw_seq == 41
    server.reply_error(req, req.error.code, req.error.reason)
    reply = _recv_reply(dealer)
    assert reply["ok"] is False and reply["code"] == "version_mismatch" and reply["re"] == 41
    dealer.close()


@pytest.mark.parametrize("msg, code, seq", [
    ({"kind": "ping", "seq": 7, "t_ns": 0}, ErrorCode.MISSING_FIELD, 7),
    ({"v": PROTOCOL_MAJOR, "kind": "no_such_kind", "seq": 8, "t_ns": 0}, ErrorCode.UNKNOWN_KIND, 8),
    ({"v": PROTOCOL_MAJOR, "kind": "arm", "seq": 9, "t_ns": 0}, ErrorCode.MISSING_FIELD, 9),
    ({"v": PROTOCOL_MAJOR, "kind": "ping", "seq": "x", "t_ns": 0}, ErrorCode.BAD_TYPE, -1),
])
def test_server_recv_invalid_message_gives_its_code_and_reply_names_a_readable_seq(ctx, short_tmp, msg, code, seq):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _dealer(ctx, _ep(short_tmp, "cmd"))
    dealer.send(msgpack.packb(msg))
    req = _recv_request(server)
    assert req.msg is None and req.error.code == code and req.raw_seq == seq
    server.reply_error(req, req.error.code, req.error.reason)
    reply = _recv_reply(dealer)
    assert reply["code"] == code.value and reply["re"] == seq
    dealer.close()


def test_server_recv_valid_request_after_bad_ones(ctx, short_tmp):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"))
    dealer = _dealer(ctx, _ep(short_tmp, "cmd"))
    dealer.send(b"junk")
    dealer.send(protocol.encode(MessageFactoryStub.make("ping", seq=3)))
    bad, good = _recv_request(server), _recv_request(server)
    assert bad.error is not None
    assert good.error is None and good.msg["kind"] == "ping" and good.raw_seq == 3
    server.reply_ok(good, pong=True)
    reply = _recv_reply(dealer)
    assert reply["ok"] is True and reply["re"] == 3 and reply["data"] == {"pong": True}
    assert server.counters.received == 2 and server.counters.rejected == 1
    dealer.close()


class MessageFactoryStub:
    """Builds a message with a chosen seq (and optionally a chosen version)."""

    @staticmethod
    def make(kind: str, seq: int, v: int = PROTOCOL_MAJOR, **fields) -> dict:
        return {"v": v, "kind": kind, "seq": seq, "t_ns": time.time_ns(), **fields}


# --------------------------------------------------------------------------- Publisher / Subscriber


def test_recv_latest_returns_the_newest_of_a_burst(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    for i in range(50):
        pub.publish("event", event="tick", data={"i": i})
    time.sleep(0.05)
    newest = sub.recv_latest(0.5)
    assert newest is not None and newest["data"] == {"i": 49}
    assert sub.recv_latest() is None  # the burst was drained


def test_recv_latest_waits_for_a_message_when_none_is_queued(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    assert sub.recv_latest(0.05) is None
    threading.Timer(0.05, lambda: pub.publish("event", event="late")).start()
    msg = sub.recv_latest(1.0)
    assert msg is not None and msg["event"] == "late"


def test_invalid_messages_on_a_stream_are_counted_and_skipped(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    base = sub.counters.received
    pub.publish("event", event="a")
    pub.send_raw(b"\xc1 garbage")
    pub.send_raw(msgpack.packb({"v": PROTOCOL_MAJOR, "kind": "event", "seq": 1, "t_ns": 0}))  # no "event" field
    pub.send_raw(msgpack.packb({"v": PROTOCOL_MAJOR + 1, "kind": "event", "seq": 2, "t_ns": 0, "event": "b"}))
    pub.publish("event", event="c")
    got = []
    deadline = time.monotonic() + 1.0
    while len(got) < 2 and time.monotonic() < deadline:
        msg = sub.recv(0.1)
        if msg is not None:
            got.append(msg["event"])
    assert got == ["a", "c"]
    assert sub.counters.received - base == 5
    assert sub.counters.rejected == 3
    assert sub.counters.by_code == {"bad_encoding": 1, "missing_field": 1, "version_mismatch": 1}
    assert sub.counters.last_error  # says why


def test_recv_latest_skips_an_invalid_newest_message(ctx, short_tmp):
    pub = Publisher(ctx, _ep(short_tmp, "state"))
    sub = Subscriber(ctx, _ep(short_tmp, "state"))
    _join(pub, sub)
    pub.publish("event", event="valid")
    pub.send_raw(b"junk")
    time.sleep(0.05)
    msg = sub.recv_latest(0.5)
    assert msg is not None and msg["event"] == "valid"
    assert sub.counters.rejected == 1


# --------------------------------------------------------------------------- frames


def test_raw_frame_arrives_bit_exact_with_its_header_without_a_copy(ctx, short_tmp):
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(FRAME_H, FRAME_W, 3), dtype=np.uint8)
    expected = pixels.copy()
    pub.send(pixels, **_frame_header(frame_seq=17, capture_ns=987654321, drops=2))
    frame = sub.recv(1.0)
    assert frame is not None
    h = frame.header
    assert (h["camera"], h["frame_seq"], h["capture_ns"], h["drops"]) == ("front", 17, 987654321, 2)
    assert (h["width"], h["height"], h["channels"], h["dtype"], h["encoding"]) == (FRAME_W, FRAME_H, 3, "uint8", "raw")
    assert frame.pixels.shape == (FRAME_H, FRAME_W, 3) and frame.pixels.dtype == np.uint8
    assert np.array_equal(frame.pixels, expected)
    # Zero copy on the receiving side: the array is a view on the ZeroMQ message buffer, not
    # a fresh allocation.
    assert not frame.pixels.flags.owndata
    base = frame.pixels
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame)
    assert np.shares_memory(frame.pixels, np.frombuffer(base, np.uint8))
    assert sub.counters.rejected == 0


def test_received_raw_frame_pixels_are_read_only(ctx):
    pub = FramePublisher(ctx, "inproc://cam")
    sub = FrameSubscriber(ctx, "inproc://cam")
    _join_frames(pub, sub)
    pixels = np.zeros((FRAME_H, FRAME_W, 3), np.uint8)
    pub.send(pixels, **_frame_header())
    frame = sub.recv(1.0)
    assert frame is not None
    assert not frame.pixels.flags.writeable


def test_non_contiguous_frame_is_refused_by_the_publisher(ctx, short_tmp):
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    pixels = np.zeros((FRAME_H, FRAME_W * 2, 3), np.uint8)[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        pub.send(pixels, **_frame_header())


@pytest.mark.parametrize("over, payload_shape, code", [
    ({"width": 320}, (FRAME_H, FRAME_W, 3), "bad_shape"),  # header smaller than the payload
    ({}, (FRAME_H, FRAME_W // 2, 3), "bad_shape"),  # payload smaller than the header
    ({"channels": 4}, (FRAME_H, FRAME_W, 3), "bad_shape"),
    ({"channels": 5}, (FRAME_H, FRAME_W, 5), "bad_shape"),
    ({"dtype": "float64"}, (FRAME_H, FRAME_W, 3), "bad_type"),
])
def test_frame_whose_header_disagrees_with_its_payload_is_rejected_not_raised(ctx, short_tmp, over, payload_shape, code):
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    pub.send(np.zeros(payload_shape, np.uint8), **_frame_header(**over))
    assert sub.recv(1.0) is None
    assert sub.counters.rejected == 1 and sub.counters.by_code == {code: 1}
    # The stream carries on.
    pub.send(np.ones((FRAME_H, FRAME_W, 3), np.uint8), **_frame_header(frame_seq=2))
    frame = sub.recv_latest(1.0)
    assert frame is not None and frame.header["frame_seq"] == 2


def test_frame_with_wrong_part_count_or_header_is_rejected(ctx, short_tmp):
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    header = protocol.encode(pub.factory.make("frame", **_frame_header(width=2, height=2)))
    pub.socket.send_multipart([header])  # no payload
    pub.socket.send_multipart([b"junk", bytes(12)])
    pub.socket.send_multipart([protocol.encode(pub.factory.make("event", event="x")), bytes(12)])
    time.sleep(0.05)
    assert sub.recv_latest(0.3) is None
    assert sub.counters.rejected == 3
    assert sub.counters.by_code == {"bad_encoding": 2, "unknown_kind": 1}


def test_jpeg_frame_is_decoded_to_rgb_close_to_the_original(ctx, short_tmp):
    cv2 = pytest.importorskip("cv2")
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    rgb = _smooth_image()
    # OpenCV encodes BGR; the receiver hands back RGB like the raw path.
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok and jpeg.nbytes < rgb.nbytes
    header = pub.factory.make("frame", **_frame_header(encoding="jpeg", frame_seq=5))
    pub.socket.send_multipart([protocol.encode(header), jpeg.tobytes()])
    frame = sub.recv(1.0)
    assert frame is not None, sub.counters.last_error
    assert frame.header["encoding"] == "jpeg" and frame.header["frame_seq"] == 5
    assert frame.pixels.shape == rgb.shape and frame.pixels.dtype == np.uint8
    err = np.abs(frame.pixels.astype(np.int16) - rgb.astype(np.int16))
    assert err.mean() < 3
    # Per channel too: a red/blue swap would put the error in the tens.
    assert all(err[..., c].mean() < 3 for c in range(3))


def test_jpeg_frame_that_does_not_decode_is_rejected(ctx, short_tmp):
    pytest.importorskip("cv2")
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    header = pub.factory.make("frame", **_frame_header(encoding="jpeg"))
    pub.socket.send_multipart([protocol.encode(header), b"\xff\xd8 not really a jpeg"])
    assert sub.recv(1.0) is None
    assert sub.counters.by_code == {"bad_encoding": 1}


# --------------------------------------------------------------------------- CURVE


@pytest.fixture
def curve_keys(tmp_path):
    if not zmq.has("curve"):
        pytest.skip("libzmq built without CURVE")
    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(keys, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys, "client")
    _, other_secret = zmq.auth.create_certificates(keys, "other")
    allowed = tmp_path / "authorized"
    allowed.mkdir()
    shutil.copy(client_public, allowed / "client.key")  # only "client" may connect
    for secret in (server_secret, client_secret, other_secret):
        Path(secret).chmod(0o600)  # zmq.auth writes them with the umask's mode; ours refuses that
    common = {"server_public_key": Path(server_public), "authorized_clients": allowed}
    return {
        "server": CurveConfig(server_secret_key=Path(server_secret), **common),
        "client": CurveConfig(client_secret_key=Path(client_secret), **common),
        "stranger": CurveConfig(client_secret_key=Path(other_secret), **common),
        "wrong_server": CurveConfig(server_public_key=Path(keys / "other.key"), client_secret_key=Path(client_secret),
                                    authorized_clients=allowed),
    }


def _curve_server(ctx, curve: CurveConfig) -> tuple[CommandServer, str]:
    server = CommandServer(ctx, "tcp://127.0.0.1:*", curve=curve)
    return server, server.socket.getsockopt_string(zmq.LAST_ENDPOINT)


def test_curve_round_trip_over_loopback_tcp(ctx, curve_keys):
    server, endpoint = _curve_server(ctx, curve_keys["server"])
    assert server.socket.curve_server
    client = CommandClient(ctx, endpoint, curve=curve_keys["client"])
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, secret="over curve"))
    assert client.request("ping", timeout_s=2.0) == {"secret": "over curve"}
    thread.join(2)


def test_curve_server_refuses_a_client_whose_key_is_not_authorized(ctx, curve_keys):
    # Encryption alone would let anyone holding the (public) server key in: the authenticator
    # admits only the keys in curve.authorized_clients.
    auth = start_authenticator(ctx, curve_keys["server"])
    try:
        server, endpoint = _curve_server(ctx, curve_keys["server"])
        stranger = CommandClient(ctx, endpoint, curve=curve_keys["stranger"])
        thread = _serve(server, lambda srv, req: srv.reply_ok(req), timeout_s=1.0)
        with pytest.raises(TimeoutError):
            stranger.request("ping", timeout_s=0.5)
        thread.join(2)
        assert server.counters.received == 0
        friend = CommandClient(ctx, endpoint, curve=curve_keys["client"])
        thread = _serve(server, lambda srv, req: srv.reply_ok(req, hello="friend"))
        assert friend.request("ping", timeout_s=2.0) == {"hello": "friend"}
        thread.join(2)
    finally:
        auth.stop()


def test_authenticator_refuses_an_empty_allow_list(ctx, curve_keys, tmp_path):
    empty = tmp_path / "nobody"
    empty.mkdir()
    with pytest.raises(ValueError, match="authorized_clients"):
        start_authenticator(ctx, curve_keys["server"].model_copy(update={"authorized_clients": empty}))


def test_curve_server_refuses_a_client_without_curve_keys(ctx, curve_keys):
    server, endpoint = _curve_server(ctx, curve_keys["server"])
    plain = CommandClient(ctx, endpoint)  # no curve: the handshake never completes
    thread = _serve(server, lambda srv, req: srv.reply_ok(req), timeout_s=1.0)
    with pytest.raises(TimeoutError):
        plain.request("ping", timeout_s=0.5)
    thread.join(2)
    assert server.counters.received == 0  # nothing got through to the application


def test_curve_client_refuses_a_server_with_another_key(ctx, curve_keys):
    """The client pins the server's public key: a server holding another key cannot answer."""
    server, endpoint = _curve_server(ctx, curve_keys["server"])
    impostor_view = CommandClient(ctx, endpoint, curve=curve_keys["wrong_server"])
    thread = _serve(server, lambda srv, req: srv.reply_ok(req), timeout_s=1.0)
    with pytest.raises(TimeoutError):
        impostor_view.request("ping", timeout_s=0.5)
    thread.join(2)
    assert server.counters.received == 0


def test_curve_binding_side_needs_the_server_secret_key(ctx, curve_keys):
    with pytest.raises(ValueError, match="server_secret_key"):
        CommandServer(ctx, "tcp://127.0.0.1:*", curve=curve_keys["client"])
    with pytest.raises(ValueError, match="client_secret_key"):
        CommandClient(ctx, "tcp://127.0.0.1:5999", curve=curve_keys["server"])


def test_curve_is_not_applied_to_ipc(ctx, short_tmp, curve_keys):
    server = CommandServer(ctx, _ep(short_tmp, "cmd"), curve=curve_keys["server"])
    assert not server.socket.curve_server
    client = CommandClient(ctx, _ep(short_tmp, "cmd"))
    thread = _serve(server, lambda srv, req: srv.reply_ok(req, x=1))
    assert client.request("ping", timeout_s=2.0) == {"x": 1}
    thread.join(2)


def test_jpeg_frame_whose_size_disagrees_with_its_header_is_rejected(ctx, short_tmp):
    cv2 = pytest.importorskip("cv2")
    pub = FramePublisher(ctx, _ep(short_tmp, "cam"))
    sub = FrameSubscriber(ctx, _ep(short_tmp, "cam"))
    _join_frames(pub, sub)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((32, 32, 3), np.uint8))
    header = pub.factory.make("frame", **_frame_header(encoding="jpeg"))  # says 640x480
    pub.socket.send_multipart([protocol.encode(header), jpeg.tobytes()])
    assert sub.recv(1.0) is None
    assert sub.counters.by_code == {"bad_shape": 1}
