"""armada wire protocol: message kinds, msgpack encoding, ndarray extension, validation.

Every message is a msgpack map with ``v`` (protocol major version), ``kind``, ``seq`` and
``t_ns`` (sender wall clock) plus kind-specific fields. Arrays travel as a msgpack extension
holding dtype, shape and raw little-endian bytes. Nothing is ever unpickled: decoding only
produces plain msgpack types and numeric numpy arrays, with every size bounded.

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
PROTOCOL_MINOR = 0
PROTOCOL_VERSION = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"

NDARRAY_EXT = 1
# Bounds keep a hostile or buggy peer from making us allocate without limit. A 1280x720x3
# frame header travels separately (see transport), so messages themselves stay small.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARRAY_BYTES = 2 * 1024 * 1024
MAX_ARRAY_NDIM = 4
MAX_CONTAINER_LEN = 4096
MAX_STR_LEN = 4096

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
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message was rejected. ``code`` is machine-readable, ``reason`` says what and why."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason


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


def _ext_hook(code: int, data: bytes) -> np.ndarray:
    if code != NDARRAY_EXT:
        raise ProtocolError(ErrorCode.BAD_ENCODING, f"unknown msgpack extension type {code}")
    dtype_name, shape, offset = _fast_header(data) or _header(data)
    if dtype_name not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"array dtype {dtype_name!r} is not allowed")
    if len(shape) > MAX_ARRAY_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(ErrorCode.BAD_SHAPE, f"array shape {shape} is not allowed")
    if any(d > MAX_ARRAY_BYTES for d in shape):  # bounds math.prod below, even with a zero dimension
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array shape {shape} exceeds {MAX_ARRAY_BYTES} bytes")
    dtype = _LITTLE[dtype_name]
    count = math.prod(shape)
    payload = data[offset:]
    if count * dtype.itemsize > MAX_ARRAY_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"array of shape {shape} exceeds {MAX_ARRAY_BYTES} bytes")
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
    # strict_map_key still lets bytes keys through; msgpack decodes ext type -1 itself (Timestamp).
    for key, value in obj.items():
        if type(key) is not str:
            raise ProtocolError(ErrorCode.BAD_ENCODING, f"map key {key!r} is not a string")
        if isinstance(value, msgpack.Timestamp):
            raise ProtocolError(ErrorCode.BAD_ENCODING, "msgpack timestamp extension (-1) is not allowed")
    return obj


def _check_list(obj: list[Any]) -> list[Any]:
    for value in obj:
        if isinstance(value, msgpack.Timestamp):
            raise ProtocolError(ErrorCode.BAD_ENCODING, "msgpack timestamp extension (-1) is not allowed")
    return obj


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


def decode(raw: bytes | memoryview) -> dict[str, Any]:
    """Decode bytes into a message map (not yet validated against its kind)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = msgpack.unpackb(
            raw, raw=False, ext_hook=_ext_hook, strict_map_key=True, object_hook=_check_map, list_hook=_check_list,
            max_str_len=MAX_STR_LEN, max_bin_len=MAX_ARRAY_BYTES, max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN, max_ext_len=MAX_ARRAY_BYTES + 256,
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
    return msg


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


def _finite_number(x: Any) -> str | None:
    return None if math.isfinite(x) else "must be finite"


def _positive(x: Any) -> str | None:
    if not math.isfinite(x):
        return "must be finite"
    return None if x > 0 else f"must be > 0, got {x}"


def _non_negative(x: Any) -> str | None:
    if not math.isfinite(x):
        return "must be finite"
    return None if x >= 0 else f"must be >= 0, got {x}"


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
    "acquire": {"client": Field(STR), "ttl_s": Field(NUM, required=False, check=_positive)},
    "release": {"lease": Field(STR)},
    # driver state machine
    "arm": {"lease": Field(STR)},
    "disarm": {"lease": Field(STR)},
    "estop": {"reason": Field(STR, required=False)},
    "reset_estop": {"lease": Field(STR)},
    "clear_fault": {"lease": Field(STR)},
    # motion
    "move_to": {"lease": Field(STR), "target": Field(ARR, check=_finite_array(1)),
                "max_velocity": Field(NUM, required=False, check=_positive)},
    "trajectory": {
        "lease": Field(STR),
        "t0_ns": Field(INT),  # driver monotonic clock, see ``ping``
        "dt": Field(NUM, check=_positive),
        "points": Field(ARR, check=_finite_array(2)),
        "merge": Field(STR, required=False, check=_one_of(*MERGE_MODES)),
        "episode": Field(INT, required=False),
        "chunk": Field(INT, required=False),
        "final": Field(BOOL, required=False),
    },
    "servo": {"lease": Field(STR), "target": Field(ARR, check=_finite_array(1))},
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
    "episode_start": {"instruction": Field(STR), "duration_s": Field(NUM, required=False, check=_positive),
                      "task": Field(STR, required=False), "arm": Field(BOOL, required=False),
                      "min_margin": Field(NUM, required=False, check=_non_negative)},
    "episode_stop": {"reason": Field(STR, required=False)},
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
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown message kind {kind!r}")
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
    if field.check is not None:
        problem = field.check(value)
        if isinstance(problem, tuple):
            code, problem = problem
            raise ProtocolError(code, f"{where}: field {name!r} {problem}")
        if problem:
            code = ErrorCode.NON_FINITE if "NaN" in problem or "finite" in problem else ErrorCode.BAD_VALUE
            raise ProtocolError(code, f"{where}: field {name!r} {problem}")


def decode_valid(raw: bytes | memoryview) -> dict[str, Any]:
    return validate(decode(raw))


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
        return self.make("reply", ok=False, re=_request_seq(request), code=code.value, reason=reason)


def _request_seq(request: dict[str, Any] | None) -> int:
    seq = request.get("seq") if isinstance(request, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else -1


def check_hello_version(version: str) -> None:
    """Refuse a peer whose protocol major version differs from ours."""
    try:
        major = int(str(version).split(".", 1)[0])
    except ValueError:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH, f"unreadable protocol version {version!r}") from None
    if major != PROTOCOL_MAJOR:
        raise ProtocolError(ErrorCode.VERSION_MISMATCH,
                            f"peer speaks protocol {version}, this side speaks {PROTOCOL_VERSION}")
