"""ZeroMQ sockets for armada: state/events PUB-SUB, commands ROUTER-DEALER, camera frames.

Rules every socket here follows: linger 0 (a dead peer never blocks shutdown), every receive
has a timeout and every drain a bound, every incoming message is bounded in size by ZeroMQ
(MAXMSGSIZE: a larger one drops the connection before it is buffered) and in structure while it
is decoded (``protocol.Limits`` per socket kind), then validated before anyone sees it; bad
messages are counted, never raised into a control loop, and every reply can be encoded. ipc
socket files are made owner-only and removed on close. CURVE encrypts TCP between hosts; plain
TCP is refused, on loopback too unless the cell opts in (every local user can reach it).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import zmq
import zmq.auth

from armada.runtime import protocol
from armada.runtime.endpoints import check_endpoint, ipc_path, is_loopback  # noqa: F401 (re-exported)
from armada.runtime.protocol import (
    COMMAND_LIMITS,
    FRAME_HEADER_LIMITS,
    REPLY_LIMITS,
    STREAM_LIMITS,
    ErrorCode,
    Limits,
    MessageFactory,
    ProtocolError,
)

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

    from armada.runtime.config import CurveConfig

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4096 * 4096 * 4
# What a publisher ever receives is a subscription (and the handshake): a few bytes.
PUBLISHER_MAX_INBOUND_BYTES = 4096
# A drain call reads at most the receive high-water mark plus this many messages, and for at most
# DRAIN_BUDGET_S: a peer that publishes faster than we decode cannot keep the caller inside.
DRAIN_SLACK = 16
DRAIN_BUDGET_S = 0.05
# Requests queued per client connection before ZeroMQ stops reading from it (back-pressure, no
# loss): a client waits for each reply, so a few are ever in flight; this bounds what a flooding
# connection can make us hold to 64 x COMMAND_LIMITS.max_bytes (7 MiB).
COMMAND_RCVHWM = 64


def _prepare(sock: zmq.Socket, endpoint: str, curve: "CurveConfig | None", server: bool,
             max_inbound_bytes: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # ZeroMQ drops the connection of a peer that sends a larger frame, before buffering it (a 1 GiB
    # frame once took a driver to 1.17 GB). Set before bind/connect: options apply to new pipes.
    sock.setsockopt(zmq.MAXMSGSIZE, max_inbound_bytes)
    if curve is not None and endpoint.startswith("tcp://"):
        server_public, _ = zmq.auth.load_certificate(
            curve.server_keys.get(urlsplit(endpoint).hostname or "", curve.server_public_key))
        if server:
            if curve.server_secret_key is None:
                raise ValueError("curve.server_secret_key is required on the binding side")
            public, secret = _load_secret_key(curve.server_secret_key)
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        else:
            if curve.client_secret_key is None:
                raise ValueError("curve.client_secret_key is required on the connecting side")
            public, secret = _load_secret_key(curve.client_secret_key)
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public


def _load_secret_key(path: Path | str) -> tuple[bytes, bytes]:
    """A CURVE key pair from a secret key file only its owner can read (zmq.auth writes them with
    the umask's mode, usually world-readable)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"CURVE secret key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"CURVE secret key {path} is readable by others (mode {stat.S_IMODE(mode):o}): "
                         f"run `chmod 600 {path}`")
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"CURVE secret key {path} holds no secret key")
    return public, secret


class _AllowList:
    """The authorized client keys, as a ZAP credentials provider that logs every refusal
    (pyzmq's own authenticator logs them at debug level only)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = set(zmq.auth.load_certificates(str(folder)))

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys:
            return True
        log.warning("CURVE client refused: its public key %s is not in %s",
                    client_key.decode("ascii", "replace"), self.folder)
        return False


def start_authenticator(ctx: zmq.Context, curve: "CurveConfig | None") -> "ThreadAuthenticator | None":
    """Allow only the cell's authorized client keys on this context's CURVE sockets.

    Call before binding; stop the returned authenticator at shutdown. Refused clients are logged
    at WARNING. Without CURVE, nothing.
    """
    if curve is None:
        return None
    from zmq.auth.thread import ThreadAuthenticator

    folder = Path(curve.authorized_clients)
    if not folder.is_dir() or not any(folder.glob("*.key")):
        raise ValueError(f"curve.authorized_clients {folder} must be a folder holding client public keys (*.key)")
    allow = _AllowList(folder)
    auth = ThreadAuthenticator(ctx, log=log.getChild("zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=allow)
    return auth


@dataclass(frozen=True)
class _IpcFile:
    """An ipc socket file this process created, identified so that close removes only it."""

    path: Path
    device: int
    inode: int

    def remove(self) -> None:
        try:
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == (self.device, self.inode):  # not another process's socket since
                self.path.unlink()
        except OSError:
            pass  # already gone, or not ours to remove


def _bind(sock: zmq.Socket, endpoint: str) -> _IpcFile | None:
    if endpoint.startswith("ipc://@"):
        raise OSError(f"cannot bind {endpoint}: abstract ipc sockets have no permissions; use a path")
    path = ipc_path(endpoint)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise OSError(f"cannot bind {endpoint}: {exc}") from None
    if path is None:
        return None
    path = ipc_path(sock.getsockopt_string(zmq.LAST_ENDPOINT)) or path  # the file bound, were it ipc://*
    # The run dir (0700) is what keeps other users out; owner-only sockets make that hold even in
    # a folder someone else can enter, whatever the umask was.
    os.chmod(path, 0o600)
    st = path.lstat()
    return _IpcFile(path, st.st_dev, st.st_ino)


def _close(sock: zmq.Socket, ipc: _IpcFile | None) -> None:
    sock.close(0)
    if ipc is not None:
        ipc.remove()


# --------------------------------------------------------------------------- counters


@dataclass
class RxCounters:
    received: int = 0
    rejected: int = 0
    last_error: str = ""
    by_code: dict[str, int] = field(default_factory=dict)

    def reject(self, err: ProtocolError) -> None:
        self.rejected += 1
        self.last_error = err.reason
        self.by_code[err.code.value] = self.by_code.get(err.code.value, 0) + 1


# --------------------------------------------------------------------------- PUB / SUB


class Publisher:
    """Binds a PUB socket. Sending never blocks: past the high-water mark, messages are dropped.

    ``publish`` refuses a message over the subscribers' limit (``limits.max_bytes``): ZeroMQ would
    drop the connection of every subscriber, and libzmq does not reconnect after that.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int = 1000, curve: "CurveConfig | None" = None,
                 limits: Limits = STREAM_LIMITS):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        _prepare(self.socket, endpoint, curve, server=True, max_inbound_bytes=PUBLISHER_MAX_INBOUND_BYTES)
        self._ipc = _bind(self.socket, endpoint)
        self.endpoint = endpoint
        self.max_bytes = limits.max_bytes
        self.factory = MessageFactory()
        self.dropped = 0

    def publish(self, kind: str, **fields: Any) -> dict[str, Any]:
        msg = self.factory.make(kind, **fields)
        raw = protocol.encode(msg)
        if len(raw) > self.max_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{kind} message of {len(raw)} bytes exceeds the "
                                                     f"subscribers' limit of {self.max_bytes}")
        self.send_raw(raw)
        return msg

    def send_raw(self, raw: bytes) -> None:
        try:
            self.socket.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        _close(self.socket, self._ipc)


class Subscriber:
    """Connects a SUB socket to one publisher and yields validated messages.

    ``recv_latest`` and ``drain`` read at most the high-water mark plus DRAIN_SLACK messages and
    for at most DRAIN_BUDGET_S per call; what is left stays queued for the next call.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: "CurveConfig | None" = None, hwm: int = 1000,
                 limits: Limits = STREAM_LIMITS):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        _prepare(self.socket, endpoint, curve, server=False, max_inbound_bytes=limits.max_bytes)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.limits = limits
        self.max_drain = hwm + DRAIN_SLACK
        self.counters = RxCounters()

    def recv(self, timeout_s: float) -> dict[str, Any] | None:
        """The next valid message, or None when none arrives within the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if not self.socket.poll(max(0, int(remaining * 1000)), zmq.POLLIN):
                return None
            msg = self._read()
            if msg is not None:
                return msg
            if remaining <= 0:
                return None

    def recv_latest(self, timeout_s: float = 0.0) -> dict[str, Any] | None:
        """The newest valid message of those queued (waits up to ``timeout_s`` for one if none).

        Bounded (see the class): under a flood, the newest of what one call read.
        """
        newest = None
        for msg in self._queued():
            newest = msg
        if newest is None and timeout_s > 0:
            newest = self.recv(timeout_s)
            if newest is not None:
                return self.recv_latest(0.0) or newest
        return newest

    def drain(self) -> list[dict[str, Any]]:
        """The valid messages queued, oldest first (bounded, see the class)."""
        return list(self._queued())

    def _queued(self) -> Iterator[dict[str, Any]]:
        deadline = time.monotonic() + DRAIN_BUDGET_S
        for _ in range(self.max_drain):
            if not self.socket.poll(0, zmq.POLLIN):
                return
            msg = self._read()
            if msg is not None:
                yield msg
            if time.monotonic() > deadline:
                return

    def _read(self) -> dict[str, Any] | None:
        raw = self.socket.recv(zmq.NOBLOCK, copy=False)
        self.counters.received += 1
        try:
            return protocol.decode_valid(raw.buffer, self.limits)
        except ProtocolError as err:
            self.counters.reject(err)
            return None

    def close(self) -> None:
        self.socket.close(0)


# --------------------------------------------------------------------------- ROUTER / DEALER


@dataclass
class Request:
    """A command received by a server: who sent it, and either the message or why it was bad."""

    identity: bytes
    msg: dict[str, Any] | None
    error: ProtocolError | None
    raw_seq: int = -1


@dataclass
class RawRequest:
    """A command as received, not yet decoded: ``kind`` is peeked (protocol.peek_kind), so a
    server can put an e-stop ahead of everything else before decoding anything."""

    identity: bytes
    parts: list[zmq.Frame]

    @property
    def kind(self) -> str | None:
        return protocol.peek_kind(self.parts[0].buffer) if len(self.parts) == 1 else None


class CommandServer:
    """Binds a ROUTER socket. Every request gets exactly one reply from the owner."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: "CurveConfig | None" = None,
                 limits: Limits = COMMAND_LIMITS):
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished clients are dropped
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        self.socket.setsockopt(zmq.RCVHWM, COMMAND_RCVHWM)
        _prepare(self.socket, endpoint, curve, server=True, max_inbound_bytes=limits.max_bytes)
        self._ipc = _bind(self.socket, endpoint)
        self.endpoint = endpoint
        self.limits = limits
        self.factory = MessageFactory()
        self.counters = RxCounters()

    def poll(self, timeout_s: float) -> bool:
        return bool(self.socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN))

    def recv(self) -> Request | None:
        """One request if one is queued (never blocks)."""
        raw = self.recv_raw()
        return None if raw is None else self.parse(raw)

    def recv_raw(self) -> RawRequest | None:
        """One request, undecoded, if one is queued (never blocks). ``parse`` decodes it."""
        try:
            parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.counters.received += 1
        return RawRequest(parts[0].bytes, parts[1:])

    def parse(self, raw: RawRequest) -> Request:
        """Decode and validate a request within this socket's limits; errors are counted."""
        identity = raw.identity
        if len(raw.parts) != 1:
            err = ProtocolError(ErrorCode.BAD_ENCODING, f"expected one message part, got {len(raw.parts)}")
            self.counters.reject(err)
            return Request(identity, None, err)
        try:
            msg = protocol.decode(raw.parts[0].buffer, self.limits)
        except ProtocolError as err:
            self.counters.reject(err)
            return Request(identity, None, err)
        seq = msg.get("seq", -1)
        try:
            protocol.validate(msg)
        except ProtocolError as err:
            self.counters.reject(err)
            return Request(identity, None, err, raw_seq=seq if type(seq) is int else -1)
        return Request(identity, msg, None, raw_seq=msg["seq"])

    def reply_ok(self, req: Request, **data: Any) -> None:
        self._send(req.identity, self.factory.ok(req.msg or {"seq": req.raw_seq}, **data))

    def reply_error(self, req: Request, code: ErrorCode, reason: str) -> None:
        self._send(req.identity, self.factory.error(req.msg or {"seq": req.raw_seq}, code, reason))

    def _send(self, identity: bytes, msg: dict[str, Any]) -> None:
        """Send a reply. Never raises: a reply that cannot be encoded (a value of no wire type, or
        larger than a client accepts: REPLY_LIMITS, over which ZeroMQ would drop the client's
        connection for good) becomes a minimal error reply, so one bad reply never kills the
        serving thread."""
        try:
            raw = protocol.encode(msg)
            if len(raw) > REPLY_LIMITS.max_bytes:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"reply of {len(raw)} bytes exceeds the clients' limit of {REPLY_LIMITS.max_bytes}")
        except Exception as exc:  # noqa: BLE001 - whatever the handler put in its reply
            raw = self._fallback_reply(msg, exc)
        try:
            self.socket.send_multipart([identity, raw], zmq.NOBLOCK)
        except zmq.Again:
            pass  # the client is gone or not reading; it will time out on its side
        except zmq.ZMQError as exc:
            log.warning("reply to a %s client not sent: %s", self.endpoint, exc)

    def _fallback_reply(self, msg: dict[str, Any], exc: Exception) -> bytes:
        code = exc.code if isinstance(exc, ProtocolError) and exc.code is ErrorCode.TOO_LARGE else ErrorCode.INTERNAL
        log.error("reply on %s could not be encoded (%s: %s); sending a %s error instead", self.endpoint,
                  type(exc).__name__, protocol.bounded_reason(str(exc), 200), code.value)
        re = msg.get("re")
        re = re if type(re) is int and protocol.INT64_MIN <= re <= protocol.INT64_MAX else -1
        reason = protocol.bounded_reason(f"the reply could not be encoded: {exc}", 200)
        return protocol.encode(self.factory.make("reply", ok=False, re=re, code=code.value, reason=reason))

    def close(self) -> None:
        _close(self.socket, self._ipc)


class RemoteError(Exception):
    """The peer answered with an error reply."""

    def __init__(self, code: str, reason: str, kind: str):
        super().__init__(f"{kind} refused: {code}: {reason}")
        self.code, self.reason, self.kind = code, reason, kind


class CommandClient:
    """Connects a DEALER socket. ``request`` always returns or raises within its timeout."""

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: "CurveConfig | None" = None,
                 default_timeout_s: float = 1.0, limits: Limits = REPLY_LIMITS):
        self.socket = ctx.socket(zmq.DEALER)
        _prepare(self.socket, endpoint, curve, server=False, max_inbound_bytes=limits.max_bytes)
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.limits = limits
        self.factory = MessageFactory()
        self.default_timeout_s = default_timeout_s

    def request(self, kind: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; returns the reply's data map.

        Raises TimeoutError when no reply comes in time and RemoteError on an error reply.
        Replies to earlier, timed-out requests are recognised by ``re`` and discarded.
        """
        msg = self.factory.make(kind, **fields)
        return self.request_raw(protocol.encode(msg), msg["seq"], kind, timeout_s)

    def request_raw(self, raw: bytes, seq: int, kind: str = "raw", timeout_s: float | None = None) -> dict[str, Any]:
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            self.socket.send(raw, zmq.NOBLOCK)
        except zmq.Again:
            raise TimeoutError(f"{kind} to {self.endpoint}: cannot send (peer not connected)") from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                raise TimeoutError(f"{kind} to {self.endpoint}: no reply within {timeout_s:.3f} s")
            try:
                reply = protocol.decode_valid(self.socket.recv(zmq.NOBLOCK), self.limits)
            except ProtocolError:
                continue  # a garbled reply is not ours to trust; keep waiting for the real one
            if reply.get("kind") != "reply" or reply.get("re") != seq:
                continue
            if not reply["ok"]:
                raise RemoteError(reply.get("code", "?"), reply.get("reason", ""), kind)
            return reply.get("data") or {}

    def close(self) -> None:
        self.socket.close(0)


# --------------------------------------------------------------------------- camera frames
#
# A frame is a multipart message: [msgpack header, pixels] or, with depth aligned to the colour
# image, [header, pixels, depth]. Raw pixels travel without a copy. With ``jpeg_quality`` the
# publisher JPEG-encodes the colour image (header ``encoding: jpeg``, ``encode_us``) and every
# receiver decodes it back to RGB transparently; depth always stays raw (JPEG would corrupt it).

FRAME_DTYPES = ("uint8", "uint16", "float32")
DEPTH_DTYPES = ("uint16", "float32")


class FramePublisher:
    """Publishes frames; raw pixel (and depth) buffers are sent without copying.

    The caller must not write into ``pixels`` or ``depth`` after sending them: ZeroMQ still
    holds them. Header fields the caller leaves out (width, height, channels, dtype, encoding)
    are taken from ``pixels``.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int = 4, curve: "CurveConfig | None" = None):
        self.socket = ctx.socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        _prepare(self.socket, endpoint, curve, server=True, max_inbound_bytes=PUBLISHER_MAX_INBOUND_BYTES)
        self._ipc = _bind(self.socket, endpoint)
        self.factory = MessageFactory()
        self.dropped = 0

    def send(self, pixels: np.ndarray, *, jpeg_quality: int | None = None, depth: np.ndarray | None = None,
             depth_scale_m: float | None = None, **header: Any) -> int:
        """Publish one frame; returns the bytes put on the wire (payload parts, header excluded)."""
        if not pixels.flags.c_contiguous:
            raise ValueError("frame pixels must be C-contiguous")
        if pixels.nbytes > MAX_FRAME_BYTES:  # subscribers drop the connection over it, for good
            raise ValueError(f"frame of {pixels.nbytes} bytes exceeds {MAX_FRAME_BYTES}")
        h, w = pixels.shape[:2]
        for key, value in (("width", w), ("height", h), ("channels", 1 if pixels.ndim == 2 else pixels.shape[2]),
                           ("dtype", pixels.dtype.name), ("encoding", "raw")):
            header.setdefault(key, value)
        payload: Any = memoryview(pixels).cast("B")
        if jpeg_quality is not None:
            payload = _encode_jpeg(pixels, jpeg_quality, header)
        parts = [payload]
        if depth is not None:
            parts.append(self._depth_part(depth, depth_scale_m, (h, w), header))
        msg = self.factory.make("frame", **header)
        try:
            self.socket.send_multipart([protocol.encode(msg), *parts], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
        return sum(p.nbytes for p in parts)

    @staticmethod
    def _depth_part(depth: np.ndarray, scale_m: float | None, size: tuple[int, int],
                    header: dict[str, Any]) -> memoryview:
        if depth.shape != size or depth.dtype.name not in DEPTH_DTYPES or not depth.flags.c_contiguous:
            raise ValueError(f"depth must be a C-contiguous {size[0]}x{size[1]} array of {DEPTH_DTYPES} aligned "
                             f"to the colour image, got {depth.shape} {depth.dtype}")
        header["depth_dtype"] = depth.dtype.name
        header["depth_scale_m"] = float(scale_m if scale_m is not None else 1.0)
        return memoryview(depth).cast("B")

    def close(self) -> None:
        _close(self.socket, self._ipc)


def _encode_jpeg(rgb: np.ndarray, quality: int, header: dict[str, Any]) -> np.ndarray:
    import cv2  # only JPEG streams pay for OpenCV

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"JPEG needs an 8-bit RGB image, got {rgb.shape} {rgb.dtype}")
    t = time.perf_counter_ns()
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode a {rgb.shape} image")
    header.update(encoding="jpeg", jpeg_quality=int(quality), encode_us=(time.perf_counter_ns() - t) // 1000)
    return jpeg


@dataclass
class Frame:
    header: dict[str, Any]
    pixels: np.ndarray  # read-only: a view on the received buffer, or the decoded JPEG (RGB)
    depth: np.ndarray | None = None  # read-only HxW, aligned to pixels; metres = depth * header["depth_scale_m"]
    wire_bytes: int = 0  # payload bytes as received (JPEG size for JPEG frames)
    decode_us: int = 0  # time spent decoding the payload here (JPEG decode; ~0 for raw)


class FrameSubscriber:
    """Receives frames; ``recv_latest`` for newest-only consumers, ``recv`` for all-frames ones.

    ``recv_latest`` validates every queued header (so bad messages are counted) but decodes the
    pixels of the newest valid frame only: a newest-only consumer of a JPEG stream pays for one
    decode, not for every frame it skips. It reads at most the high-water mark plus DRAIN_SLACK
    frames and for at most DRAIN_BUDGET_S per call; what is left stays queued for the next call.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, hwm: int = 8, curve: "CurveConfig | None" = None):
        self.socket = ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        # Per part: the largest colour or depth image a header may announce (see _view).
        _prepare(self.socket, endpoint, curve, server=False, max_inbound_bytes=MAX_FRAME_BYTES)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)
        self.max_drain = hwm + DRAIN_SLACK
        self.counters = RxCounters()

    def recv(self, timeout_s: float) -> Frame | None:
        if not self.socket.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        return self._read()

    def recv_latest(self, timeout_s: float = 0.0) -> Frame | None:
        candidates: list[tuple[dict[str, Any], list[zmq.Frame]]] = []
        deadline = time.monotonic() + DRAIN_BUDGET_S
        for _ in range(self.max_drain):
            if not self.socket.poll(0, zmq.POLLIN) or time.monotonic() > deadline:
                break
            parts = self._recv_parts()
            header = self._checked(decode_frame_header, parts)
            if header is not None:
                candidates = [*candidates[-3:], (header, parts)]  # a few, in case the newest fails to decode
        for header, parts in reversed(candidates):
            frame = self._checked(lambda p, h=header: decode_frame_payload(h, p), parts)
            if frame is not None:
                return frame
        if timeout_s > 0:
            newest = self.recv(timeout_s)
            if newest is not None:
                return self.recv_latest(0.0) or newest
        return None

    def _recv_parts(self) -> list[zmq.Frame]:
        parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        self.counters.received += 1
        return parts

    def _checked(self, fn: Any, parts: list[zmq.Frame]) -> Any:
        try:
            return fn(parts)
        except ProtocolError as err:
            self.counters.reject(err)
            return None

    def _read(self) -> Frame | None:
        return self._checked(decode_frame, self._recv_parts())

    def close(self) -> None:
        self.socket.close(0)


def decode_frame(parts: list[zmq.Frame]) -> Frame:
    return decode_frame_payload(decode_frame_header(parts), parts)


def decode_frame_header(parts: list[zmq.Frame]) -> dict[str, Any]:
    """The validated header of a frame message (cheap: the payload is not touched)."""
    if len(parts) not in (2, 3):
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"a frame has 2 parts (3 with depth), got {len(parts)}")
    header = protocol.decode_valid(parts[0].buffer, FRAME_HEADER_LIMITS)
    if header["kind"] != "frame":
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"expected a frame header, got {header['kind']!r}")
    has_depth = "depth_dtype" in header
    if has_depth != (len(parts) == 3):
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"a frame of {len(parts)} parts "
                                                    f"{'with' if has_depth else 'without'} depth_dtype in its header")
    return header


def decode_frame_payload(header: dict[str, Any], parts: list[zmq.Frame]) -> Frame:
    t = time.perf_counter_ns()
    buf = parts[1].buffer
    pixels = _decode_jpeg(header, buf) if header["encoding"] == "jpeg" else _raw_view(header, buf)
    depth = _depth_view(header, parts[2].buffer) if len(parts) == 3 else None
    wire = len(buf) + (len(parts[2].buffer) if len(parts) == 3 else 0)
    return Frame(header, pixels, depth, wire, (time.perf_counter_ns() - t) // 1000)


def _decode_jpeg(header: dict[str, Any], buf: memoryview) -> np.ndarray:
    import cv2  # only consumers of JPEG streams pay for OpenCV

    if len(buf) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"JPEG payload of {len(buf)} bytes is too large")
    bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ProtocolError(ErrorCode.BAD_ENCODING, "JPEG payload does not decode")
    expected = (header["height"], header["width"], header["channels"])
    if bgr.shape != expected:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"JPEG decodes to {bgr.shape}, header says {expected}")
    pixels = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV decodes BGR; frames are RGB
    pixels.flags.writeable = False
    return pixels


def _raw_view(header: dict[str, Any], buf: memoryview) -> np.ndarray:
    if header["dtype"] not in FRAME_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"frame dtype {header['dtype']!r} is not allowed")
    shape = (header["height"], header["width"], header["channels"])
    if min(shape) <= 0 or shape[2] > 4:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"frame shape {shape} is not allowed")
    return _view(buf, np.dtype(header["dtype"]), shape, "frame")


def _depth_view(header: dict[str, Any], buf: memoryview) -> np.ndarray:
    dtype = header["depth_dtype"]
    scale = header.get("depth_scale_m")
    if dtype not in DEPTH_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"depth dtype {dtype!r} is not one of {DEPTH_DTYPES}")
    if not isinstance(scale, float) or not 0 < scale < 1e3:
        raise ProtocolError(ErrorCode.BAD_VALUE, f"depth_scale_m must be a positive float, got {scale!r}")
    return _view(buf, np.dtype(dtype), (header["height"], header["width"]), "depth")


def _view(buf: memoryview, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    if min(shape) <= 0:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{what} shape {shape} is not allowed")
    expected = dtype.itemsize
    for d in shape:  # Python ints: a hostile header cannot overflow this
        expected *= d
    if expected > MAX_FRAME_BYTES or len(buf) != expected:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"{what} payload is {len(buf)} bytes, header says {expected}")
    # Read-only: the buffer belongs to ZeroMQ (and, over inproc, to the sender's array).
    view = np.frombuffer(buf, dtype=dtype).reshape(shape)
    view.flags.writeable = False
    return view
