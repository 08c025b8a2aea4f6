"""armada wire protocol: message kinds, msgpack encoding, ndarray extension, validation.

Every message is a msgpack map with ``v`` (protocol major version), ``kind``, ``seq`` and
``t_ns`` (sender wall clock) plus kind-specific fields. Arrays travel as a msgpack extension
holding dtype, shape and raw little-endian bytes. Nothing is ever unpickled: decoding only
produces plain msgpack types and numeric numpy arrays (a msgpack timestamp arrives as its integer
nanoseconds), with every size, count and depth bounded per socket kind (``Limits``).

Decoding and validation raise ``ProtocolError`` with an ``ErrorCode`` and a reason; the
receiver turns that into an ``error`` reply and carries on.
"""

from __future__ import annotations

import enum
import itertools
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 1  # 1.1: intervene/resume on the inference ctl socket
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"

NDARRAY_EXT = 1
# Bounds keep a hostile or buggy peer from making us allocate without limit. A 1280x720x3
# frame header travels separately (see transport), so messages themselves stay small.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARRAY_BYTES = 2 * 1024 * 1024
MAX_ARRAY_NDIM = 4
MAX_CONTAINER_LEN = 4096
MAX_STR_LEN = 4096
MAX_REASON_CHARS = 300  # an error reason is for a human; it must never make its reply too large
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
     "float16", "float32", "float64"]
)


class ErrorCode(enum.StrEnum):
    BAD_ENCODING = "bad_encoding"
    TOO_LARGE = "too_large"
    VERSION_MISMATCH = "version_mismatch"
    UNKNOWN_KIND = "unknown_kind"
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"
    BAD_SHAPE = "bad_shape"
    NON_FINITE = "non_finite"
    BAD_VALUE = "bad_value"
    NO_LEASE = "no_lease"
    LEASE_HELD = "lease_held"
    BAD_STATE = "bad_state"
    ESTOPPED = "estopped"
    TOO_FAR = "too_far"
    LATE = "late"  # a chunk whose every point is already in the past: skip it, it is not a fault
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message was rejected. ``code`` is machine-readable, ``reason`` says what and why."""

    def __init__(self, code: ErrorCode, reason: str):
        reason = bounded_reason(reason)  # it goes into a reply, and a reply must always encode
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason


def bounded_reason(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` cut to ``limit`` characters, saying how long it was."""
    reason = str(reason)
    if len(reason) <= limit:
        return reason
    return f"{reason[:limit - 40]}... [{len(reason)} characters, cut]"


def short_repr(value: Any, limit: int = 48) -> str:
    """A repr of a value received from a peer, never longer than about ``limit`` characters.

    Cheap whatever the value: a megabyte key is sliced before repr, never repr'd whole.
    """
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        text = repr(bytes(value[:limit]) if isinstance(value, memoryview) else value[:limit])
        if len(value) > limit or len(text) > 5 * limit:  # escapes make a repr up to 10x its value
            text = f"{text[:limit]}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
        return text
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, (dict, list, tuple)):
        return f"<a {type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- encoding


# Little-endian dtype string ('<f8', '|u1') -> wire name. ``dtype.name`` costs microseconds per
# call, and a 500 Hz state stream encodes four arrays a tick.
_WIRE_NAME = {np.dtype(n).newbyteorder("<").str: n for n in ALLOWED_DTYPES}
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}  # (name, shape) -> packed header
_HEADER_CACHE_MAX = 1024


def _encode_ndarray(arr: np.ndarray) -> msgpack.ExtType:
    name = _WIRE_NAME.get(arr.dtype.str)
    if name is None:  # big-endian, or not a numeric dtype at all
        name = arr.dtype.name if arr.dtype.name in ALLOWED_DTYPES else None
        if name is None:
            raise ProtocolError(ErrorCode.BAD_TYPE, f"array dtype {arr.dtype} is not a numeric dtype")
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.ndim > MAX_ARRAY_NDIM:
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"array of {arr.ndim} dimensions exceeds {MAX_ARRAY_NDIM}")
    if arr.nbytes > MAX_ARRAY_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array of {arr.nbytes} bytes exceeds {MAX_ARRAY_BYTES}")
    key = (name, arr.shape)
    header = _HEADERS.get(key)
    if header is None:
        header = msgpack.packb([name, list(arr.shape)])
        if len(_HEADERS) < _HEADER_CACHE_MAX:
            _HEADERS[key] = header
    # tobytes(order="C") copies in C order whatever the layout, and keeps a 0-d array 0-d.
    return msgpack.ExtType(NDARRAY_EXT, header + arr.tobytes(order="C"))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise ProtocolError(ErrorCode.BAD_TYPE, f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    if code != NDARRAY_EXT:
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"unknown msgpack extension type {code}")
    dtype_name, shape, offset = _fast_header(data) or _header(data)
    if dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"array dtype {short_repr(dtype_name)} is not allowed")
    if len(shape) > MAX_ARRAY_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"array shape {short_repr(shape, 80)} is not allowed")
    if any(d > max_bytes for d in shape):  # bounds math.prod below, even with a zero dimension
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array shape {shape} exceeds {max_bytes} bytes")
    dtype = _LITTLE[dtype_name]
    count = math.prod(shape)
    payload = data[offset:]
    if count * dtype.itemsize > max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array of shape {shape} exceeds {max_bytes} bytes")
    if len(payload) != count * dtype.itemsize:
        raise ProtocolError(ErrorCode.BAD_SHAPE,
                            f"array payload is {len(payload)} bytes, shape {shape} {dtype_name} needs "
                            f"{count * dtype.itemsize}")
    # A native-order copy: the caller owns it, and it outlives the receive buffer.
    return np.frombuffer(payload, dtype=dtype, count=count).reshape(shape).astype(_NATIVE[dtype_name])


_LITTLE = {n: np.dtype(n).newbyteorder("<") for n in ALLOWED_DTYPES}
_NATIVE = {n: np.dtype(n) for n in ALLOWED_DTYPES}
_UINT_CODES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack uint 8/16/32/64, big-endian


def _fast_header(data: bytes) -> tuple[str, list[int], int] | None:
    """Parse the header as the encoder writes it ([fixstr, fixarray of uints]) without building
    an Unpacker, which costs most of a small array's decode. Anything else: None, and the full
    parser decides (and names the error)."""
    try:
        if data[0] != 0x92:
            return None
        name_len = data[1] - 0xA0
        if not 0 <= name_len <= 16:
            return None
        pos = 2 + name_len
        name = bytes(data[2:pos]).decode("ascii")
        ndim = data[pos] - 0x90
        if not 0 <= ndim <= MAX_ARRAY_NDIM:
            return None
        pos += 1
        shape = []
        for _ in range(ndim):
            byte = data[pos]
            if byte <= 0x7F:
                shape.append(byte)
                pos += 1
                continue
            width = _UINT_CODES.get(byte)
            if width is None:
                return None
            shape.append(int.from_bytes(data[pos + 1:pos + 1 + width], "big"))
            pos += 1 + width
        return name, shape, pos
    except (IndexError, UnicodeDecodeError):
        return None


def _header(data: bytes) -> tuple[str, list, int]:
    """The general header parser: any valid msgpack, with precise errors."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data), max_array_len=MAX_ARRAY_NDIM + 2,
                                max_str_len=16, max_bin_len=0, max_map_len=0, max_ext_len=0)
    unpacker.feed(data)
    try:
        header = unpacker.unpack()
    except Exception as exc:
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"unreadable array header: {exc}") from None
    if not (isinstance(header, list) and len(header) == 2 and isinstance(header[0], str)
            and isinstance(header[1], list)):
        raise ProtocolError(ErrorCode.BAD_ENCODING, "array header must be [dtype, shape]")
    return header[0], header[1], unpacker.tell()


def _check_map(obj: dict[Any, Any]) -> dict[str, Any]:
    # strict_map_key still lets bytes keys through. The key types are collected at C speed; only a
    # refused map is walked in Python, to name its key.
    if obj and _STR_ONLY != set(map(type, obj)):
        key = next(k for k in obj if type(k) is not str)
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"map key {short_repr(key)} is not a string")
    return obj


_STR_ONLY = {str}


@dataclass(frozen=True)
class Limits:
    """What one incoming message may hold, enforced before and while it is decoded.

    Size alone does not bound the cost of decoding: an ndarray extension costs microseconds of
    Python, a map or list a hook call, so a few megabytes of tiny ones keep a thread (and, since
    msgpack's decoder holds the GIL, every thread) busy for seconds. Counting them in the hooks
    stops the decoder at the first object over the limit.
    """

    max_bytes: int  # the whole message (ZeroMQ drops larger ones before we see them: MAXMSGSIZE)
    max_containers: int  # maps and arrays, the message's own map included
    max_container_len: int  # entries in one map or array
    max_depth: int  # the message's map is depth 1
    max_exts: int  # ndarray extensions
    max_array_bytes: int  # one ndarray's payload
    max_str_len: int = MAX_STR_LEN  # bytes of one string
    max_bin_len: int = 64 * 1024  # bytes of one bin value

    def __post_init__(self) -> None:
        if self.max_array_bytes > MAX_ARRAY_BYTES or self.max_bytes > MAX_MESSAGE_BYTES:
            raise ValueError("limits above the protocol's own bounds would let through what encode refuses")


# The protocol's own bounds: anything decoded without naming a socket kind (files, tools). Every
# socket names a tighter kind below.
PROTOCOL_LIMITS = Limits(max_bytes=MAX_MESSAGE_BYTES, max_containers=4096, max_container_len=MAX_CONTAINER_LEN,
                         max_depth=64, max_exts=256, max_array_bytes=MAX_ARRAY_BYTES, max_bin_len=MAX_ARRAY_BYTES)
# Streams (state, events): a state message is a handful of joint arrays and two small maps (a few
# KB); events carry small reports. A megabyte is generous and still decodes in tens of ms at worst.
STREAM_LIMITS = Limits(max_bytes=1024 * 1024, max_containers=256, max_container_len=512, max_depth=16,
                       max_exts=64, max_array_bytes=1024 * 1024, max_bin_len=64 * 1024)
# Requests on a command socket (a driver's cmd, the inference ctl): the largest legitimate one is a
# trajectory chunk, one float64 array of points x joints (a few hundred x up to 14 today; 96 KiB is
# 877 x 14 or 768 x 16) plus a few scalar fields or an instruction string. Everything else is a flat
# map. Sized so that the worst message a command socket accepts decodes, or is refused, in about a
# millisecond: past the counted objects, decoding costs about 6 ns per byte at worst (timestamps in
# 1000 nested, never completed arrays), hence the byte bound.
MAX_COMMAND_ARRAY_BYTES = 96 * 1024
COMMAND_LIMITS = Limits(max_bytes=MAX_COMMAND_ARRAY_BYTES + 16 * 1024, max_containers=32, max_container_len=32,
                        max_depth=4, max_exts=4, max_array_bytes=MAX_COMMAND_ARRAY_BYTES, max_bin_len=4096)
# Replies a command client reads: the driver's hello (its description: names, limits, groups),
# stats and the inference status. Small, but nested.
REPLY_LIMITS = Limits(max_bytes=1024 * 1024, max_containers=256, max_container_len=512, max_depth=16,
                      max_exts=64, max_array_bytes=MAX_COMMAND_ARRAY_BYTES)
# A camera frame's header part (its pixels travel in the next parts, never through msgpack).
FRAME_HEADER_LIMITS = Limits(max_bytes=16 * 1024, max_containers=16, max_container_len=64, max_depth=4,
                             max_exts=4, max_array_bytes=8 * 1024, max_str_len=1024, max_bin_len=1024)


class _Budget:
    """The decoder's hooks for one message: they count what they see and stop at the limit."""

    __slots__ = ("limits", "containers", "exts")

    def __init__(self, limits: Limits):
        self.limits, self.containers, self.exts = limits, 0, 0

    def _container(self) -> None:
        self.containers += 1
        if self.containers > self.limits.max_containers:
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"message holds more than {self.limits.max_containers} maps and arrays")

    def on_map(self, obj: dict[Any, Any]) -> dict[str, Any]:
        self._container()
        return _check_map(obj)

    def on_list(self, obj: list[Any]) -> list[Any]:
        self._container()
        return obj

    def on_ext(self, code: int, data: bytes) -> np.ndarray:
        self.exts += 1
        if self.exts > self.limits.max_exts:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"message holds more than {self.limits.max_exts} arrays")
        return _ext_hook(code, data, self.limits.max_array_bytes)


_CONTAINERS = (dict, list)
_CONTAINER_SET = frozenset(_CONTAINERS)


def _depth(msg: dict[str, Any], max_depth: int) -> int:
    """How deeply ``msg`` nests maps and arrays, counting no further than ``max_depth + 1``.

    Children are picked out at C speed (map, compress): a Python loop over every element of a
    few thousand containers would cost more than decoding them did.
    """
    deepest, stack = 1, [(msg, 1)]
    while stack and deepest <= max_depth:
        obj, depth = stack.pop()
        deepest = max(deepest, depth)
        values = obj.values() if isinstance(obj, dict) else obj
        if _CONTAINER_SET.isdisjoint(map(type, values)):
            continue  # the usual case, a map or array of scalars
        children = itertools.compress(values, map(isinstance, values, itertools.repeat(_CONTAINERS)))
        stack.extend(zip(children, itertools.repeat(depth + 1)))
    return deepest


_local = threading.local()


def _packer() -> msgpack.Packer:
    """One Packer per thread: building one per message costs more than packing a state message.
    (A Packer resets its buffer when a pack raises, so reuse after an error is safe.)"""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return packer


def encode(msg: dict[str, Any]) -> bytes:
    """Encode a message map. Raises ProtocolError for unencodable or oversized content."""
    try:
        raw = _packer().pack(msg)
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"cannot encode message: {exc}") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return raw


def decode(raw: bytes | memoryview, limits: Limits = PROTOCOL_LIMITS) -> dict[str, Any]:
    """Decode bytes into a message map (not yet validated against its kind), within ``limits``."""
    if len(raw) > limits.max_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(raw)} bytes exceeds {limits.max_bytes}")
    budget = _Budget(limits)
    try:
        msg = msgpack.unpackb(
            raw, raw=False, ext_hook=budget.on_ext, strict_map_key=True, object_hook=budget.on_map,
            list_hook=budget.on_list, max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
            max_ext_len=limits.max_array_bytes + 256,
            # msgpack decodes ext type -1 (a timestamp) itself, never through ext_hook. As a
            # Timestamp object each costs a Python call that no limit counts; as int nanoseconds
            # it is a plain integer, built in C.
            timestamp=2,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        if isinstance(exc, msgpack.StackError) or "exceeds max_" in str(exc):
            raise ProtocolError(ErrorCode.TOO_LARGE,
                                f"message exceeds a size limit: {str(exc) or 'nested too deeply'}") from None
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"not a valid msgpack message: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"message must be a map, got {type(msg).__name__}")
    # A message of n maps and arrays nests at most n deep: most never need the walk.
    if budget.containers > limits.max_depth and _depth(msg, limits.max_depth) > limits.max_depth:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message nests maps and arrays deeper than {limits.max_depth}")
    return msg


# The kind of a message, read without decoding the rest: enough to give an e-stop priority over a
# queue of other requests. Our encoder writes ``v`` then ``kind`` first; another sender may order
# its keys differently, so a few are skipped, but never more than the first bytes of a message.
PEEK_BYTES = 256
PEEK_KEYS = 8


def peek_kind(raw: bytes | memoryview) -> str | None:
    """The message's top-level ``kind`` if it is a known kind, else None (for anything odd).

    Bounded work whatever ``raw`` holds: it reads at most PEEK_BYTES bytes and PEEK_KEYS keys,
    builds no arrays and calls no hooks. The message still has to be decoded and validated.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PEEK_BYTES, max_str_len=PEEK_BYTES,
                                max_bin_len=PEEK_BYTES, max_array_len=PEEK_KEYS, max_map_len=PEEK_KEYS,
                                max_ext_len=PEEK_BYTES)
    try:
        unpacker.feed(raw[:PEEK_BYTES])
        for _ in range(min(unpacker.read_map_header(), PEEK_KEYS)):
            key = unpacker.unpack()
            if key == "kind":
                kind = unpacker.unpack()
                return kind if type(kind) is str and kind in KINDS else None
            unpacker.skip()
    except Exception:  # truncated, not a map, over a limit: all just "not recognised"
        return None
    return None


# --------------------------------------------------------------------------- message kinds


# A check returns None, a reason (classified as non_finite or bad_value), or (code, reason).
Problem = str | tuple[ErrorCode, str] | None


@dataclass(frozen=True)
class Field:
    """One field of a message kind. ``check`` refines beyond the Python type."""

    types: tuple[type, ...]
    required: bool = True
    check: Callable[[Any], Problem] | None = None


def _finite_array(ndim: int | None = None, max_len: int = MAX_CONTAINER_LEN) -> Callable[[Any], Problem]:
    def check(a: np.ndarray) -> Problem:
        if ndim is not None and a.ndim != ndim:
            return ErrorCode.BAD_SHAPE, f"must have {ndim} dimensions, has shape {a.shape}"
        if a.size > max_len * (1 if ndim in (None, 1) else max_len):
            return ErrorCode.TOO_LARGE, f"too many elements ({a.size})"
        if a.dtype.kind not in "fiu":
            return ErrorCode.BAD_TYPE, f"must be numeric, got {a.dtype}"
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            return "contains NaN or infinity"
        return None
    return check


@dataclass(frozen=True)
class Range:
    """A finite number in [lo, hi]: every numeric field a receiver acts on has one, so no value
    can reach a handler and raise there (``dt=5e-324`` once overflowed inside the driver)."""

    lo: float
    hi: float
    unit: str = ""

    def __call__(self, x: Any) -> str | None:
        if isinstance(x, float) and not math.isfinite(x):
            return "must be finite"
        if self.lo <= x <= self.hi:
            return None
        return f"must be between {_num(self.lo)} and {_num(self.hi)}{self.unit}, got {short_repr(x)}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _one_of(*options: str) -> Callable[[Any], str | None]:
    return lambda x: None if x in options else f"must be one of {', '.join(options)}"


NUM = (int, float)
ARR = (np.ndarray,)
STR = (str,)
INT = (int,)
BOOL = (bool,)
MAP = (dict,)
LIST = (list,)

MERGE_MODES = ("replace", "crossfade", "average")

# Fields present in every message.
COMMON: dict[str, Field] = {
    "v": Field(INT),
    "kind": Field(STR),
    "seq": Field(INT),
    "t_ns": Field(INT),
}
# Every integer field fits a signed 64-bit integer (checked for all, see _check_field); these are
# the bounds of the numbers a handler computes with.
TTL_S = Range(0.001, 60.0, " s")  # the cell's lease TTL caps it further (a client may only ask for less)
VELOCITY = Range(0.001, 1000.0, " (rad/s or m/s)")  # below that, a move would be planned for hours
CLOCK_NS = Range(0, 2**62, " ns")  # a monotonic clock, with room to add a chunk's duration
DT_S = Range(1e-4, 10.0, " s")
DURATION_S = Range(0.001, 7 * 86400.0, " s")
MARGIN = Range(0.0, 1.0)  # a difference of two probabilities

# Kind-specific fields. Commands that move the arm carry the lease token they were granted.
KINDS: dict[str, dict[str, Field]] = {
    # handshake and liveness
    "hello": {"version": Field(STR), "role": Field(STR), "name": Field(STR, required=False),
              "description": Field(MAP, required=False)},
    "ping": {},
    "heartbeat": {"lease": Field(STR)},
    "reply": {"ok": Field(BOOL), "re": Field(INT), "code": Field(STR, required=False),
              "reason": Field(STR, required=False), "data": Field(MAP, required=False)},
    # control lease
    "acquire": {"client": Field(STR), "ttl_s": Field(NUM, required=False, check=TTL_S)},
    "release": {"lease": Field(STR)},
    # driver state machine
    "arm": {"lease": Field(STR)},
    "disarm": {"lease": Field(STR)},
    "estop": {"reason": Field(STR, required=False)},
    "reset_estop": {"lease": Field(STR)},
    "clear_fault": {"lease": Field(STR)},
    # motion
    "move_to": {"lease": Field(STR), "target": Field(ARR, check=_finite_array(1)),
                "max_velocity": Field(NUM, required=False, check=VELOCITY)},
    "trajectory": {
        "lease": Field(STR),
        "t0_ns": Field(INT, check=CLOCK_NS),  # driver monotonic clock, see ``ping``
        "dt": Field(NUM, check=DT_S),
        "points": Field(ARR, check=_finite_array(2)),
        "merge": Field(STR, required=False, check=_one_of(*MERGE_MODES)),
        "episode": Field(INT, required=False),
        "chunk": Field(INT, required=False),
        "final": Field(BOOL, required=False),
    },
    # ``group`` (optional, a group name): ``target`` is that group's entries only, and the other
    # groups keep their current targets (teleop drives the base with a gamepad while the arms
    # follow leaders). Without it, ``target`` is the whole action vector. A base group's entries
    # are velocities, followed for the group's command_timeout_s after the servo's interpolation,
    # then ramped to zero unless another servo of the base renews them.
    "servo": {"lease": Field(STR), "target": Field(ARR, check=_finite_array(1)),
              "group": Field(STR, required=False)},
    "stats": {"reset": Field(BOOL, required=False)},
    # published streams
    "state": {"mono_ns": Field(INT), "mode": Field(STR), "measured": Field(ARR), "requested": Field(ARR),
              "commanded": Field(ARR), "velocity": Field(ARR), "counters": Field(MAP),
              "episode": Field(INT, required=False), "chunk": Field(INT, required=False),
              "device": Field(MAP, required=False)},  # backend-specific extras (a UR's TCP pose, ...)
    "frame": {"camera": Field(STR), "frame_seq": Field(INT), "capture_ns": Field(INT),
              "width": Field(INT), "height": Field(INT), "channels": Field(INT),
              "dtype": Field(STR), "encoding": Field(STR, check=_one_of("raw", "jpeg")),
              "drops": Field(INT, required=False)},
    "event": {"event": Field(STR), "data": Field(MAP, required=False)},
    # inference episode control (ctl socket)
    "episode_start": {"instruction": Field(STR), "duration_s": Field(NUM, required=False, check=DURATION_S),
                      "task": Field(STR, required=False), "arm": Field(BOOL, required=False),
                      "min_margin": Field(NUM, required=False, check=MARGIN)},
    "episode_stop": {"reason": Field(STR, required=False)},
    "intervene": {},  # the operator takes over the running episode; the inference side releases its leases
    "resume": {},  # the operator hands back; the inference side takes its leases again
    "status": {},
    "shutdown": {},
}


def validate(msg: dict[str, Any]) -> dict[str, Any]:
    """Check a decoded message against its kind. Returns it unchanged or raises ProtocolError."""
    for name, field in COMMON.items():
        _check_field(msg, name, field, "message")
    if msg["v"] != PROTOCOL_MAJOR:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"protocol major version {msg['v']} is not supported (this side speaks {PROTOCOL_MAJOR})")
    kind = msg["kind"]
    fields = KINDS.get(kind)
    if fields is None:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {short_repr(kind)}")
    for name, field in fields.items():
        _check_field(msg, name, field, kind)
    return msg


def _check_field(msg: dict[str, Any], name: str, field: Field, where: str) -> None:
    if name not in msg:
        if field.required:
            raise ProtocolError(ErrorCode.MISSING_FIELD, f"{where}: field {name!r} is missing")
        return
    value = msg[name]
    # bool is an int in Python; a bool where a number is wanted is almost always a bug.
    if not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types):
        expected = "/".join(t.__name__ for t in field.types)
        raise ProtocolError(ErrorCode.BAD_TYPE, f"{where}: field {name!r} must be {expected}, "
                                                 f"got {type(value).__name__}")
    # msgpack carries integers up to 2**64 - 1; beyond int64 they overflow numpy and C code.
    # (Any ``v`` but ours is a version mismatch, which validate reports as such.)
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX and name != "v":
        raise ProtocolError(ErrorCode.BAD_VALUE, f"{where}: field {name!r} must fit a signed 64-bit integer, "
                                                 f"got {short_repr(value)}")
    if field.check is not None:
        problem = field.check(value)
        if isinstance(problem, tuple):
            code, problem = problem
            raise ProtocolError(code, f"{where}: field {name!r} {problem}")
        if problem:
            code = ErrorCode.NON_FINITE if "NaN" in problem or "finite" in problem else ErrorCode.BAD_VALUE
            raise ProtocolError(code, f"{where}: field {name!r} {problem}")


def decode_valid(raw: bytes | memoryview, limits: Limits = PROTOCOL_LIMITS) -> dict[str, Any]:
    return validate(decode(raw, limits))


# --------------------------------------------------------------------------- building messages


class MessageFactory:
    """Stamps outgoing messages with version, a per-sender sequence number and wall time."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)

    def make(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"v": PROTOCOL_MAJOR, "kind": kind, "seq": next(self._seq), "t_ns": time.time_ns(), **fields}

    def ok(self, request: dict[str, Any] | None, **data: Any) -> dict[str, Any]:
        return self.make("reply", ok=True, re=_request_seq(request), data=data)

    def error(self, request: dict[str, Any] | None, code: ErrorCode, reason: str) -> dict[str, Any]:
        return self.make("reply", ok=False, re=_request_seq(request), code=code.value, reason=bounded_reason(reason))


def _request_seq(request: dict[str, Any] | None) -> int:
    seq = request.get("seq") if isinstance(request, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else -1


def check_hello_version(version: str) -> None:
    """Refuse a peer whose protocol major version differs from ours."""
    try:
        major = int(str(version).split(".", 1)[0])
    except ValueError:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"unreadable protocol version {short_repr(version)}") from None
    if major != PROTOCOL_MAJOR:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"peer speaks protocol {short_repr(version)}, this side speaks {PROTOCOL_VERSION}")
