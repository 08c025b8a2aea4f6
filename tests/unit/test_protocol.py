"""Wire protocol: msgpack encoding, the ndarray extension, validation and the message factory.

Property-based where it pays: every kind round-trips with arbitrary valid field values, arrays
of every allowed dtype/shape/layout/byte order come back bit-exact, and arbitrary or mutated
bytes only ever raise ``ProtocolError``.
"""

from __future__ import annotations

import ast
import math
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from armada.runtime import protocol as P
from armada.runtime.protocol import (
    ALLOWED_DTYPES,
    COMMON,
    KINDS,
    MAX_ARRAY_BYTES,
    MAX_ARRAY_NDIM,
    MAX_CONTAINER_LEN,
    MAX_MESSAGE_BYTES,
    MAX_STR_LEN,
    MERGE_MODES,
    NDARRAY_EXT,
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    ErrorCode,
    Field,
    MessageFactory,
    ProtocolError,
    check_hello_version,
    decode,
    decode_valid,
    encode,
    validate,
)

DTYPES = sorted(ALLOWED_DTYPES)
NUMERIC_DTYPES = [d for d in DTYPES if d != "bool"]
FLOAT_DTYPES = [d for d in DTYPES if d.startswith("float")]
INT64 = st.integers(-(2**63), 2**64 - 1)  # everything msgpack's int family can carry
SIGNED64 = st.integers(-(2**63), 2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=24)

SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- helpers


def rejects(code: ErrorCode, fn, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code is code, f"expected {code.value}, got {err.code.value}: {err.reason}"
    assert isinstance(err.reason, str) and err.reason
    assert str(err).startswith(code.value)
    return err


def wire_rejects(code: ErrorCode, msg: dict[str, Any]) -> ProtocolError:
    """The message fails validation on the receiving side (after a real encode/decode)."""
    return rejects(code, decode_valid, msgpack.packb(msg, default=P._default, use_bin_type=True))


def assert_array_same(sent: np.ndarray, got: Any, where: str = "array") -> None:
    assert isinstance(got, np.ndarray), f"{where}: got {type(got).__name__}"
    native = np.dtype(sent.dtype.name)
    assert got.dtype == native, f"{where}: dtype {got.dtype} != {native}"
    assert got.dtype.isnative and got.dtype.byteorder in ("=", "|"), f"{where}: byte order {got.dtype.byteorder}"
    assert got.shape == sent.shape, f"{where}: shape {got.shape} != {sent.shape}"
    # Bit-exact: NaN payloads, -0.0 and subnormals must survive too.
    assert got.tobytes() == sent.astype(native).tobytes(), f"{where}: values differ"


def assert_same(sent: Any, got: Any, where: str = "msg") -> None:
    """``got`` is what ``sent`` must decode to: same structure, same types, same bits."""
    if isinstance(sent, np.ndarray):
        assert_array_same(sent, got, where)
    elif isinstance(sent, np.generic):
        assert_same(sent.item(), got, where)
    elif isinstance(sent, dict):
        assert type(got) is dict, f"{where}: {type(got).__name__}"
        assert list(got) == list(sent), f"{where}: keys {list(got)} != {list(sent)}"
        for key in sent:
            assert_same(sent[key], got[key], f"{where}.{key}")
    elif isinstance(sent, (list, tuple)):
        assert type(got) is list and len(got) == len(sent), f"{where}: {got!r}"
        for i, (a, b) in enumerate(zip(sent, got)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(sent, float):
        assert type(got) is float and struct.pack("<d", sent) == struct.pack("<d", got), f"{where}: {got!r}"
    else:
        assert type(got) is type(sent) and got == sent, f"{where}: {got!r} != {sent!r}"


def _strided(a: np.ndarray) -> np.ndarray:
    """Same values, as a non-contiguous view into a larger buffer."""
    big = np.zeros(a.shape + (2,), dtype=a.dtype)
    big[..., 0] = a
    return big[..., 0]


LAYOUTS = {
    "as_is": lambda a: a,
    "transposed": lambda a: a.T,
    "reversed": lambda a: a[::-1] if a.ndim else a,
    "every_other": lambda a: a[::2] if a.ndim else a,
    "strided": _strided,
    "fortran": np.asfortranarray,
}


@st.composite
def arrays(draw, dtypes: list[str] = DTYPES, min_dims: int = 0, max_dims: int = MAX_ARRAY_NDIM,
           finite: bool = False, layouts: bool = True) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=5))
    elements = None
    if finite and dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if layouts:
        arr = arr.astype(arr.dtype.newbyteorder(draw(st.sampled_from(["=", "<", ">"]))))
        arr = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))](arr)
    return arr


# Values allowed inside free-form maps (``data``, ``counters``, ``description``).
SCALARS = st.none() | st.booleans() | INT64 | FINITE | TEXT | st.binary(max_size=16)
NESTED = st.recursive(SCALARS | arrays(), lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(TEXT, inner, max_size=4), max_leaves=10)
MAPS = st.dictionaries(TEXT, NESTED, max_size=5)


def _one_of_options(check: Any) -> tuple[str, ...] | None:
    """The options of a ``_one_of(...)`` check, read from its closure."""
    for cell in getattr(check, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, tuple) and value and all(isinstance(o, str) for o in value):
            return value
    return None


def _type_strategy(types: tuple[type, ...]) -> st.SearchStrategy:
    by_type = {bool: st.booleans(), int: INT64, float: FINITE, str: TEXT, dict: MAPS, list: st.lists(NESTED, max_size=4),
               np.ndarray: arrays()}
    return st.one_of(*[by_type[t] for t in types])


def field_strategy(kind: str, name: str, field: Field) -> st.SearchStrategy:
    """Arbitrary values that a correct sender may put in this field."""
    check = field.check
    if field.types == P.ARR and check is not None:
        # The checked arrays are the motion targets: finite, numeric, 1-d (targets) or 2-d (points).
        ndims = [n for n in (1, 2) if check(np.zeros((2,) * n)) is None]
        assert ndims, f"{kind}.{name}: no known array shape passes its check"
        strategy = st.one_of(*[arrays(NUMERIC_DTYPES, min_dims=n, max_dims=n, finite=True) for n in ndims])
    elif isinstance(check, P.Range):
        ints = st.integers(math.ceil(check.lo), math.floor(check.hi))
        strategy = ints if field.types == P.INT else ints | st.floats(min_value=check.lo, max_value=check.hi)
    elif field.types == P.STR and _one_of_options(check):
        strategy = st.sampled_from(_one_of_options(check))
    elif field.types == P.INT:
        strategy = SIGNED64  # every integer field fits int64 (the wire's uint64 range does not)
    else:
        strategy = _type_strategy(field.types)
    if check is not None:
        strategy = strategy.filter(lambda v: check(v) is None)
    return strategy


@st.composite
def kind_fields(draw, kind: str) -> dict[str, Any]:
    fields = {}
    for name, field in KINDS[kind].items():
        if field.required or draw(st.booleans()):
            fields[name] = draw(field_strategy(kind, name, field))
    return fields


def minimal_value(field: Field) -> Any:
    """A simple valid value for a field, for hand-written tests."""
    candidates: list[Any] = []
    for t in field.types:
        candidates += {str: ["x", *(_one_of_options(field.check) or ())], int: [1], float: [0.5], bool: [True],
                       dict: [{}], list: [[]], np.ndarray: [np.zeros(3), np.zeros((2, 3))]}[t]
    for value in candidates:
        if field.check is None or field.check(value) is None:
            return value
    raise AssertionError(f"no minimal value for {field}")


def valid_message(kind: str, optional: bool = False, **override: Any) -> dict[str, Any]:
    fields = {n: minimal_value(f) for n, f in KINDS[kind].items() if f.required or optional}
    fields.update(override)
    return MessageFactory().make(kind, **fields)


ALL_FIELDS = [("<common>", n, f) for n, f in COMMON.items()] + [
    (k, n, f) for k, fields in KINDS.items() for n, f in fields.items()]
REQUIRED_FIELDS = [(k, n) for k, n, f in ALL_FIELDS if f.required]
CHECKED_NUMBERS = [(k, n, f) for k, n, f in ALL_FIELDS if isinstance(f.check, P.Range)]
CHECKED_ARRAYS = [(k, n) for k, n, f in ALL_FIELDS if f.types == P.ARR and f.check is not None]


def _msg_for(kind: str, name: str, value: Any) -> dict[str, Any]:
    if kind == "<common>":
        return {**valid_message("ping"), name: value}
    return {**valid_message(kind, optional=True), name: value}


def _with_raw(msg: dict[str, Any], raw_value: bytes) -> bytes:
    """Pack ``msg`` with its ``data`` map holding hand-made bytes (an ext, a bad key...)."""
    marker = b"\x00@@placeholder@@\x00"
    packed = msgpack.packb({**msg, "data": {"a": marker}}, use_bin_type=True)
    packed_marker = msgpack.packb(marker, use_bin_type=True)
    assert packed.count(packed_marker) == 1
    return packed.replace(packed_marker, raw_value)


def ext_bytes(header: Any, payload: bytes = b"", code: int = NDARRAY_EXT) -> bytes:
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(header) + payload))


def event_with(raw_value: bytes) -> bytes:
    return _with_raw(MessageFactory().make("event", event="test"), raw_value)


# --------------------------------------------------------------------------- round trips


def test_kinds_table_is_sane():
    assert {"hello", "reply", "trajectory", "servo", "move_to", "state", "ping", "heartbeat"} <= set(KINDS)
    assert set(COMMON) == {"v", "kind", "seq", "t_ns"}
    for kind, fields in KINDS.items():
        assert not set(fields) & set(COMMON), kind
        for name, field in fields.items():
            assert field.types, (kind, name)
    assert ("trajectory", "points") in CHECKED_ARRAYS and ("move_to", "target") in CHECKED_ARRAYS
    assert any(k == "trajectory" and n == "dt" for k, n, _ in CHECKED_NUMBERS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_minimal_message_of_every_kind_is_valid(kind):
    for optional in (False, True):
        msg = valid_message(kind, optional=optional)
        assert validate(msg) is msg
        assert_same(msg, decode_valid(encode(msg)))


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(SLOW, max_examples=60)
@given(data=st.data())
def test_every_kind_round_trips_with_arbitrary_valid_fields(kind, data):
    fields = data.draw(kind_fields(kind), label="fields")
    msg = MessageFactory().make(kind, **fields)
    assert validate(msg) is msg  # the receiver's rules accept what a correct sender builds
    raw = encode(msg)
    assert isinstance(raw, bytes) and len(raw) <= MAX_MESSAGE_BYTES
    got = decode_valid(raw)
    assert_same(msg, got)
    assert encode(got) == raw  # canonical: re-encoding the decoded message gives the same bytes


@settings(SLOW, max_examples=300)
@given(arr=arrays())
def test_arrays_of_every_dtype_shape_layout_and_byte_order_round_trip(arr):
    msg = MessageFactory().make("event", event="arrays", data={"a": arr, "nested": [{"b": arr}]})
    got = decode_valid(encode(msg))
    for out in (got["data"]["a"], got["data"]["nested"][0]["b"]):
        assert_array_same(arr, out)
        assert out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (0, 3), (3, 0), (2, 3), (0, 0, 0, 0), (2, 1, 3, 2)])
@pytest.mark.parametrize("order", ["<", ">"])
def test_array_edge_shapes(dtype, shape, order):
    size = math.prod(shape)
    arr = (np.arange(size) % 2 == 1) if dtype == "bool" else np.arange(size)
    arr = arr.astype(dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder(order))
    got = decode(encode({"a": arr}))["a"]
    assert_array_same(arr, got)
    assert got.ndim == len(shape)  # a 0-d array stays 0-d


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_extreme_values(dtype):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        values = np.array([True, False, True])
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        values = np.array([info.min, info.max, 0, 1], dtype=dt)
    else:
        info = np.finfo(dt)
        values = np.array([np.nan, np.inf, -np.inf, -0.0, info.max, info.min, info.smallest_subnormal, info.eps],
                          dtype=dt)
    for arr in (values, values.astype(dt.newbyteorder(">")), values[::-1], values[::2]):
        assert_array_same(arr, decode(encode({"a": arr}))["a"])


def test_decoded_array_does_not_alias_the_receive_buffer():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = bytearray(encode(MessageFactory().make("event", event="x", data={"a": arr})))
    got = decode_valid(memoryview(buf))["data"]["a"]
    buf[:] = b"\xff" * len(buf)  # transports reuse receive buffers
    np.testing.assert_array_equal(got, arr)
    got[0, 0] = 42.0  # and a driver may modify what it received


def test_numpy_scalars_travel_as_plain_values():
    msg = MessageFactory().make("trajectory", lease="l", t0_ns=np.int64(123), dt=np.float32(0.25),
                                points=np.zeros((2, 3)), episode=np.uint32(7), final=np.bool_(True))
    got = decode_valid(encode(msg))
    assert type(got["t0_ns"]) is int and got["t0_ns"] == 123
    assert type(got["dt"]) is float and got["dt"] == 0.25
    assert type(got["episode"]) is int and type(got["final"]) is bool


@pytest.mark.parametrize("raw_type", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like(raw_type):
    msg = valid_message("servo", target=np.ones(6))
    assert_same(msg, decode_valid(raw_type(encode(msg))))


# --------------------------------------------------------------------------- validation: rejections


@pytest.mark.parametrize("kind,name", REQUIRED_FIELDS)
def test_missing_required_field(kind, name):
    msg = _msg_for(kind, name, None)
    del msg[name]
    err = wire_rejects(ErrorCode.MISSING_FIELD, msg)
    assert repr(name) in err.reason
    rejects(ErrorCode.MISSING_FIELD, validate, msg)


def test_optional_fields_may_be_absent():
    for kind in KINDS:
        msg = valid_message(kind)
        for name, field in KINDS[kind].items():
            assert (name in msg) == field.required


WRONG_VALUES = [None, True, False, 0, 7, -3, 1.5, 0.0, "x", "", b"x", [1], [], {"a": 1}, {}, np.zeros(3),
                np.zeros((2, 3))]


def _acceptable(value: Any, field: Field) -> bool:
    return isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)


@pytest.mark.parametrize("kind,name,field", ALL_FIELDS, ids=[f"{k}.{n}" for k, n, _ in ALL_FIELDS])
def test_wrong_types_are_bad_type(kind, name, field):
    tried = 0
    for value in WRONG_VALUES:
        if _acceptable(value, field):
            continue
        tried += 1
        err = wire_rejects(ErrorCode.BAD_TYPE, _msg_for(kind, name, value))
        assert repr(name) in err.reason
    assert tried


@pytest.mark.parametrize("kind,name", [
    ("<common>", "v"), ("<common>", "seq"), ("<common>", "t_ns"), ("trajectory", "t0_ns"),
    ("trajectory", "dt"), ("trajectory", "episode"), ("trajectory", "chunk"), ("frame", "width"),
    ("frame", "frame_seq"), ("reply", "re"), ("acquire", "ttl_s"), ("state", "mono_ns")])
@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_int(kind, name, value):
    wire_rejects(ErrorCode.BAD_TYPE, _msg_for(kind, name, value))


@pytest.mark.parametrize("value", [1, 0, 1.0, "true"])
def test_int_is_not_a_bool(value):
    wire_rejects(ErrorCode.BAD_TYPE, _msg_for("reply", "ok", value))


@settings(max_examples=100)
@given(kind=st.text(max_size=20).filter(lambda k: k not in KINDS))
def test_unknown_kind(kind):
    err = wire_rejects(ErrorCode.UNKNOWN_KIND, {**valid_message("ping"), "kind": kind})
    assert repr(kind) in err.reason


@pytest.mark.parametrize("kind", ["Ping", "ping ", "hello\x00", "__class__", "get"])
def test_unknown_kind_lookalikes(kind):
    wire_rejects(ErrorCode.UNKNOWN_KIND, {**valid_message("ping"), "kind": kind})


@settings(max_examples=100)
@given(v=st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != PROTOCOL_MAJOR))
def test_other_major_version_is_refused(v):
    wire_rejects(ErrorCode.VERSION_MISMATCH, {**valid_message("ping"), "v": v})


def test_version_is_checked_before_kind():
    # A peer from another major version may have kinds we do not know: tell it the real problem.
    wire_rejects(ErrorCode.VERSION_MISMATCH, {**valid_message("ping"), "v": PROTOCOL_MAJOR + 1, "kind": "teleport"})
    wire_rejects(ErrorCode.VERSION_MISMATCH, {**valid_message("ping"), "v": PROTOCOL_MAJOR + 1, "kind": "servo"})


@pytest.mark.parametrize("kind,name", CHECKED_ARRAYS)
@settings(SLOW, max_examples=40)
@given(data=st.data())
def test_non_finite_arrays_are_refused(kind, name, data):
    ndim = 1 if kind != "trajectory" else 2
    arr = data.draw(arrays(FLOAT_DTYPES, min_dims=ndim, max_dims=ndim, finite=True, layouts=False)
                    .filter(lambda a: a.size > 0))
    arr = arr.copy()
    index = data.draw(st.integers(0, arr.size - 1))
    arr.reshape(-1)[index] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    arr = arr.astype(arr.dtype.newbyteorder(data.draw(st.sampled_from(["<", ">"]))))
    wire_rejects(ErrorCode.NON_FINITE, _msg_for(kind, name, arr))


@pytest.mark.parametrize("kind,name", CHECKED_ARRAYS)
def test_checked_arrays_shape_dtype_and_size(kind, name):
    good_ndim = 2 if kind == "trajectory" else 1
    for ndim in range(0, MAX_ARRAY_NDIM + 1):
        if ndim != good_ndim:
            wire_rejects(ErrorCode.BAD_SHAPE, _msg_for(kind, name, np.zeros((2,) * ndim)))
    wire_rejects(ErrorCode.BAD_TYPE, _msg_for(kind, name, np.zeros((2,) * good_ndim, dtype=bool)))
    if good_ndim == 1:
        wire_rejects(ErrorCode.TOO_LARGE, _msg_for(kind, name, np.zeros(MAX_CONTAINER_LEN + 1, np.float32)))
    for dtype in NUMERIC_DTYPES:  # ints are fine (e.g. servo ticks); empty is the driver's business
        decode_valid(encode(_msg_for(kind, name, np.zeros((2,) * good_ndim, dtype=dtype))))


@pytest.mark.parametrize("kind,name,field", CHECKED_NUMBERS, ids=[f"{k}.{n}" for k, n, _ in CHECKED_NUMBERS])
def test_checked_numbers(kind, name, field):
    lo, hi = field.check.lo, field.check.hi
    floats = field.types != P.INT
    for bad in (math.nan, math.inf, -math.inf) if floats else ():
        err = wire_rejects(ErrorCode.NON_FINITE, _msg_for(kind, name, bad))
        assert repr(name) in err.reason
    out_of_range = [-1, -(2**63), 2**63 - 1, math.floor(lo) - 1, math.ceil(hi) + 1]
    out_of_range += [lo - 1e-9 * max(1.0, abs(lo)), hi * 1.000001 + 1e-9, 5e-324, -5.0, 1e300] if floats else []
    for bad in out_of_range:  # finite but out of range: bad_value naming the field and the bound
        if lo <= bad <= hi:
            continue
        err = wire_rejects(ErrorCode.BAD_VALUE, _msg_for(kind, name, bad))
        assert repr(name) in err.reason and "between" in err.reason
    for good in [lo, hi, math.ceil(lo)] + ([(lo + hi) / 2] if floats else []):
        if lo <= good <= hi:
            decode_valid(encode(_msg_for(kind, name, good)))


@pytest.mark.parametrize("kind,name,bad", [("trajectory", "merge", "blend"), ("trajectory", "merge", ""),
                                           ("trajectory", "merge", "REPLACE"), ("frame", "encoding", "png")])
def test_enumerated_strings(kind, name, bad):
    wire_rejects(ErrorCode.BAD_VALUE, _msg_for(kind, name, bad))


def test_every_merge_mode_is_accepted():
    for mode in MERGE_MODES:
        decode_valid(encode(valid_message("trajectory", merge=mode)))


# --------------------------------------------------------------------------- decoding: rejections


@pytest.mark.parametrize("top", [[], [1, 2], 1, -1, 1.5, "ping", b"ping", None, True, np.zeros(3)])
def test_top_level_must_be_a_map(top):
    rejects(ErrorCode.BAD_ENCODING, decode, msgpack.packb(top, default=P._default, use_bin_type=True))


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x81", b"\x82\xa1v\x01", b"\xa5ab", b"\x81\xa2\xff\xfe\x01",
                                 b"\xd9\x02\xff\xfe", b"\x81\xa1v\xcb\x00"])
def test_truncated_or_invalid_msgpack(raw):
    rejects(ErrorCode.BAD_ENCODING, decode, raw)


def test_trailing_garbage():
    raw = encode(valid_message("ping"))
    rejects(ErrorCode.BAD_ENCODING, decode, raw + b"\x00")
    rejects(ErrorCode.BAD_ENCODING, decode, raw + raw)


def _decode_only_protocol_errors(raw: bytes) -> None:
    try:
        msg = decode_valid(raw)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.reason
    except Exception as exc:  # noqa: BLE001 - that is the point of the test
        pytest.fail(f"decode_valid raised {type(exc).__name__}: {exc} for {raw[:64]!r}")
    else:
        assert isinstance(msg, dict) and msg["kind"] in KINDS


@settings(SLOW, max_examples=2000)
@given(raw=st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(raw):
    _decode_only_protocol_errors(raw)


# Arbitrary msgpack documents (any keys, any ext): valid msgpack, nonsense messages.
ANY_KEY = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | TEXT | st.binary(max_size=8)
ANY_EXT = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=40))
ANY_VALUE = st.recursive(ANY_KEY | ANY_EXT | arrays(layouts=False),
                         lambda inner: st.lists(inner, max_size=5) | st.dictionaries(ANY_KEY, inner, max_size=5),
                         max_leaves=20)


@settings(SLOW, max_examples=500)
@given(doc=ANY_VALUE, kind=st.sampled_from(sorted(KINDS)), common=st.booleans())
def test_arbitrary_msgpack_documents_only_raise_protocol_error(doc, kind, common):
    if common and isinstance(doc, dict):
        doc = {**valid_message(kind), **doc}  # get past the common fields, into the kind's checks
    _decode_only_protocol_errors(msgpack.packb(doc, default=P._default, use_bin_type=True))


@st.composite
def mutated_messages(draw) -> bytes:
    kind = draw(st.sampled_from(sorted(KINDS)))
    raw = bytearray(encode(MessageFactory().make(kind, **draw(kind_fields(kind)))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[i] = draw(st.sampled_from([0x00, 0xc1, 0xc7, 0xd4, 0xd6, 0xdc, 0xdd, 0xde, 0xdf, 0xff, 0x7f]))
        elif op == "truncate":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[i:i + draw(st.integers(1, 8))]
    return bytes(raw)


@settings(SLOW, max_examples=600)
@given(raw=mutated_messages())
def test_mutated_valid_messages_only_raise_protocol_error(raw):
    _decode_only_protocol_errors(raw)


@pytest.mark.parametrize("key", [1, -1, 0, 1.5, None, True, b"v", b"kind", (1, 2)])
def test_map_keys_must_be_strings(key):
    base = valid_message("ping")
    rejects(ErrorCode.BAD_ENCODING, decode, msgpack.packb({**base, key: 1}, use_bin_type=True))
    nested = MessageFactory().make("event", event="x", data={"ok": {"deeper": [{key: 1}]}})
    rejects(ErrorCode.BAD_ENCODING, decode, msgpack.packb(nested, use_bin_type=True))


def test_array_as_map_key_is_refused():
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(b"\x81" + msgpack.packb(
        msgpack.ExtType(NDARRAY_EXT, msgpack.packb(["uint8", [1]]) + b"\x01")) + b"\x01"))


def test_invalid_utf8_is_refused():
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(b"\xa2\xff\xfe"))
    rejects(ErrorCode.BAD_ENCODING, decode, b"\x81\xa2\xc3\x28\x01")


# --------------------------------------------------------------------------- the ndarray extension


@pytest.mark.parametrize("dtype", ["object", "O", "|O", "str", "<U4", "U4", "S4", "bytes", "bytes_", "complex64",
                                   "complex128", "clongdouble", "V8", "void", "datetime64", "datetime64[ns]",
                                   "timedelta64", "float128", "longdouble", "<f8", ">f4", "f8", "float", "int",
                                   "", "FLOAT32", "float32 ", "b1"])
def test_ext_refuses_non_numeric_or_unknown_dtypes(dtype):
    rejects(ErrorCode.BAD_TYPE, decode, event_with(ext_bytes([dtype, [1]], b"\x00" * 16)))
    rejects(ErrorCode.BAD_TYPE, decode, event_with(ext_bytes([dtype, [0]])))


def test_ext_refuses_an_absurd_dtype_name():
    with pytest.raises(ProtocolError):
        decode(event_with(ext_bytes(["x" * 200, [1]], b"\x00")))


@pytest.mark.parametrize("values", [np.array(["a", "b"]), np.array([b"a"]), np.array([1, "a"], dtype=object),
                                    np.array([1 + 2j]), np.array([1 + 2j], dtype=np.complex64),
                                    np.array(["2024-01-01"], dtype="datetime64[D]"), np.array([1], dtype="m8[s]"),
                                    np.zeros(2, dtype=[("x", "f4"), ("y", "i4")]), np.zeros(2, dtype="V4")])
def test_encode_refuses_non_numeric_arrays(values):
    rejects(ErrorCode.BAD_TYPE, encode, {"a": values})


@settings(SLOW, max_examples=300)
@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=MAX_ARRAY_NDIM, min_side=0,
                                                            max_side=6),
       delta=st.integers(-64, 64).filter(bool))
def test_ext_shape_must_match_payload(dtype, shape, delta):
    needed = math.prod(shape) * np.dtype(dtype).itemsize
    assume(needed + delta >= 0)
    err = rejects(ErrorCode.BAD_SHAPE, decode, event_with(ext_bytes([dtype, list(shape)], b"\x01" * (needed + delta))))
    assert str(needed) in err.reason
    decode(event_with(ext_bytes([dtype, list(shape)], b"\x01" * needed)))  # and the exact size is fine


@pytest.mark.parametrize("shape", [[-1], [2, -1], [-(2**63)], [1, 1, 1, 1, 1], [True], [False, 3], [1.0], ["3"],
                                   [None], [[1]]])
def test_ext_refuses_bad_shapes(shape):
    rejects(ErrorCode.BAD_SHAPE, decode, event_with(ext_bytes(["uint8", shape], b"\x00")))


@pytest.mark.parametrize("shape", [[2**40], [2**64 - 1], [MAX_ARRAY_BYTES + 1], [0, 2**40], [2**32, 2**32, 0]])
def test_ext_refuses_absurd_dimensions_as_too_large(shape):
    # the same code the sender's encoder gives for an over-sized array, even when a zero dimension
    # would make the product small
    rejects(ErrorCode.TOO_LARGE, decode, event_with(ext_bytes(["uint8", shape], b"\x00")))


@pytest.mark.parametrize("header", [{"dtype": "uint8", "shape": [1]}, ["uint8"], ["uint8", [1], 0], [1, [1]],
                                    ["uint8", 1], ["uint8", "1"], "uint8", None, [b"uint8", [1]],
                                    ["uint8", [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]])
def test_ext_refuses_malformed_headers(header):
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(ext_bytes(header, b"\x00")))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92", b"\x92\xa5uint8"])
def test_ext_refuses_unreadable_headers(data):
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(msgpack.packb(msgpack.ExtType(NDARRAY_EXT, data))))


def test_ext_header_claiming_a_huge_array_is_too_large():
    rejects(ErrorCode.TOO_LARGE, decode, event_with(ext_bytes(["float64", [1024, 1024]])))
    rejects(ErrorCode.TOO_LARGE, decode, event_with(ext_bytes(["uint64", [512, 512, 512, 512]])))


def test_ext_array_over_the_limit_with_its_payload_is_too_large():
    n = MAX_ARRAY_BYTES + 1
    rejects(ErrorCode.TOO_LARGE, decode, event_with(ext_bytes(["uint8", [n]], b"\x00" * n)))


@pytest.mark.parametrize("code", [0, 2, 3, 42, 127])
def test_unknown_ext_type_codes(code):
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(msgpack.packb(msgpack.ExtType(code, b"\x00" * 4))))


@pytest.mark.parametrize("raw", [
    b"\xd4\xfe\x00",  # ext -2
    b"\xd4\x80\x00",  # ext -128
    b"\xd4\xff\x00",  # ext -1 of a length no timestamp has
])
def test_negative_ext_type_codes(raw):
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(raw))
    rejects(ErrorCode.BAD_ENCODING, decode, event_with(b"\x91" + raw))  # inside a list too


@pytest.mark.parametrize("raw,ns", [
    (b"\xd6\xff\x00\x00\x00\x01", 10**9),  # ext -1: a msgpack Timestamp (32-bit)
    (b"\xd7\xff" + b"\x00" * 7 + b"\x02", 2 * 10**9),  # Timestamp (64-bit)
    (b"\xc7\x0c\xff" + b"\x00" * 11 + b"\x03", 3 * 10**9),  # Timestamp (96-bit)
])
def test_timestamps_arrive_as_plain_integer_nanoseconds(raw, ns):
    # Decoding produces plain msgpack types and numeric arrays only. msgpack decodes ext -1 itself
    # (not through ext_hook); as int nanoseconds it costs no Python call per timestamp.
    assert decode(event_with(raw))["data"]["a"] == ns
    assert decode(event_with(b"\x91" + raw))["data"]["a"] == [ns]
    assert type(decode(event_with(raw))["data"]["a"]) is int


# --------------------------------------------------------------------------- sizes


def test_array_size_limit_on_encode():
    at_limit = np.zeros(MAX_ARRAY_BYTES, dtype=np.uint8)
    assert_array_same(at_limit, decode(encode({"a": at_limit}))["a"])
    rejects(ErrorCode.TOO_LARGE, encode, {"a": np.zeros(MAX_ARRAY_BYTES + 1, dtype=np.uint8)})
    rejects(ErrorCode.TOO_LARGE, encode, {"a": np.zeros(MAX_ARRAY_BYTES // 8 + 1, dtype=np.float64)})
    # a non-contiguous view is measured by what it would send
    rejects(ErrorCode.TOO_LARGE, encode, {"a": np.zeros(2 * MAX_ARRAY_BYTES + 4, dtype=np.uint8)[::2]})


def test_ndim_limit_on_encode():
    rejects(ErrorCode.BAD_SHAPE, encode, {"a": np.zeros((1,) * (MAX_ARRAY_NDIM + 1))})


def test_message_size_limit_on_encode():
    chunk = np.zeros(MAX_ARRAY_BYTES * 3 // 4, dtype=np.uint8)
    rejects(ErrorCode.TOO_LARGE, encode, MessageFactory().make("event", event="x", data={"a": chunk, "b": chunk,
                                                                                     "c": chunk}))


def test_message_size_limit_on_decode():
    blob = b"\x00" * (MAX_ARRAY_BYTES - 16)
    raw = msgpack.packb({**valid_message("event"), "data": {"a": blob, "b": blob, "c": b"\x00" * 64}},
                        use_bin_type=True)
    assert len(raw) > MAX_MESSAGE_BYTES
    rejects(ErrorCode.TOO_LARGE, decode, raw)
    rejects(ErrorCode.TOO_LARGE, decode, memoryview(raw))
    rejects(ErrorCode.TOO_LARGE, decode, b"\xc1" * (MAX_MESSAGE_BYTES + 1))  # size is checked before parsing


def _packed_event(value: Any) -> bytes:
    return msgpack.packb({**valid_message("event"), "data": {"a": value}}, use_bin_type=True)


def test_container_and_string_limits():
    decode(_packed_event([0] * MAX_CONTAINER_LEN))
    decode(_packed_event({str(i): 0 for i in range(MAX_CONTAINER_LEN)}))
    decode(_packed_event("a" * MAX_STR_LEN))
    decode(_packed_event(b"a" * MAX_ARRAY_BYTES))
    rejects(ErrorCode.TOO_LARGE, decode, _packed_event([0] * (MAX_CONTAINER_LEN + 1)))
    rejects(ErrorCode.TOO_LARGE, decode, _packed_event({str(i): 0 for i in range(MAX_CONTAINER_LEN + 1)}))
    rejects(ErrorCode.TOO_LARGE, decode, _packed_event("a" * (MAX_STR_LEN + 1)))
    rejects(ErrorCode.TOO_LARGE, decode, _packed_event(b"a" * (MAX_ARRAY_BYTES + 1)))


@pytest.mark.parametrize("header,code", [
    (b"\xdd", ErrorCode.TOO_LARGE), (b"\xdf", ErrorCode.TOO_LARGE),  # array32, map32: refused on the count
    # str32, bin32: msgpack waits for the bytes before checking the length, so a short message
    # is simply truncated; either way nothing is allocated for the claimed 4 GiB
    (b"\xdb", ErrorCode.BAD_ENCODING), (b"\xc6", ErrorCode.BAD_ENCODING)])
def test_lying_length_prefixes_do_not_allocate(header, code):
    start = time.perf_counter()
    rejects(code, decode, header + b"\xff\xff\xff\xff" + b"\x00" * 16)
    rejects(code, decode, event_with(header + b"\xff\xff\xff\xff" + b"\x00" * 16))
    assert time.perf_counter() - start < 1.0


def test_lying_ext_length_is_refused():
    with pytest.raises(ProtocolError):
        decode(event_with(b"\xc9\xff\xff\xff\xff\x01" + b"\x00" * 16))


@pytest.mark.parametrize("depth", [1100, 5000, 200_000])
def test_deep_nesting_is_refused(depth):
    start = time.perf_counter()
    rejects(ErrorCode.TOO_LARGE, decode, event_with(b"\x91" * depth + b"\xc0"))
    rejects(ErrorCode.TOO_LARGE, decode, event_with(b"\x81\xa1k" * depth + b"\xc0"))
    assert time.perf_counter() - start < 2.0


def test_moderate_nesting_is_fine():
    value: Any = 1
    for i in range(40):
        value = [value] if i % 2 else {"k": value}
    msg = MessageFactory().make("event", event="x", data={"v": value})
    assert_same(msg, decode_valid(encode(msg)))


# --------------------------------------------------------------------------- never pickle


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "copyreg"}


def test_protocol_module_never_imports_pickle():
    source = Path(P.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
            imported |= {alias.name for alias in node.names}
    assert not imported & PICKLE_MODULES, imported & PICKLE_MODULES
    for line in source.splitlines():
        if line.lstrip().startswith(("import ", "from ")):
            assert "pickle" not in line, line
    assert "allow_pickle" not in source and "__import__" not in source and "np.load" not in source


@pytest.mark.parametrize("proto", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_payloads_are_bad_encoding(proto):
    rejects(ErrorCode.BAD_ENCODING, decode, pickle.dumps(valid_message("ping"), protocol=proto))
    rejects(ErrorCode.BAD_ENCODING, decode, pickle.dumps(np.zeros(3), protocol=proto))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_not_executed(tmp_path):
    live, marker = tmp_path / "live", tmp_path / "marker"
    pickle.loads(pickle.dumps(_Evil(live))).close()  # the payload really does run when unpickled
    assert live.exists()
    for payload in (pickle.dumps(_Evil(marker)), pickle.dumps({"v": 1, "kind": "ping", "x": _Evil(marker)})):
        rejects(ErrorCode.BAD_ENCODING, decode, payload)
        # and hidden inside an ext or a bin, it is just bytes
        with pytest.raises(ProtocolError):
            decode(event_with(msgpack.packb(msgpack.ExtType(NDARRAY_EXT, payload))))
        decode(_packed_event(payload))
    assert not marker.exists()


def test_decoding_never_calls_pickle(monkeypatch):
    import _pickle

    def boom(*_a, **_k):
        raise AssertionError("pickle used while decoding")

    for module in (pickle, _pickle):
        for name in ("loads", "load", "Unpickler"):
            monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(np, "load", boom)
    arrays_ = {d: np.arange(6).astype(d).reshape(2, 3) for d in DTYPES}
    msg = MessageFactory().make("event", event="x", data=arrays_)
    assert_same(msg, decode_valid(encode(msg)))
    for raw in (pickle.dumps(msg), b"\x80\x05\x95"):
        with pytest.raises(ProtocolError):
            decode(raw)


# --------------------------------------------------------------------------- factory and handshake


def test_factory_stamps_common_fields():
    f = MessageFactory()
    before = time.time_ns()
    msg = f.make("heartbeat", lease="abc")
    after = time.time_ns()
    assert msg["v"] == PROTOCOL_MAJOR and msg["kind"] == "heartbeat" and msg["lease"] == "abc"
    assert type(msg["seq"]) is int and type(msg["t_ns"]) is int
    assert before <= msg["t_ns"] <= after


def test_factory_seq_increases_across_all_builders():
    f = MessageFactory()
    req = valid_message("ping")
    seqs = []
    for i in range(50):
        build = [lambda: f.make("ping"), lambda: f.ok(req), lambda: f.error(req, ErrorCode.BAD_STATE, "no")][i % 3]
        seqs.append(build()["seq"])
    assert seqs == list(range(seqs[0], seqs[0] + 50))
    # factories are independent senders
    assert MessageFactory().make("ping")["seq"] == MessageFactory().make("ping")["seq"]


@settings(SLOW, max_examples=200)
@given(seq=SIGNED64, data=MAPS.filter(lambda d: not {"self", "request"} & set(d)))
def test_ok_reply_echoes_request_seq(seq, data):
    f = MessageFactory()
    request = decode_valid(encode({**valid_message("ping"), "seq": seq}))
    reply = f.ok(request, **data)
    assert reply["kind"] == "reply" and reply["ok"] is True and reply["re"] == seq
    assert list(reply["data"]) == list(data)
    got = decode_valid(encode(reply))
    assert got["re"] == seq
    assert_same(reply, got)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_reply_for_every_code(code):
    f = MessageFactory()
    request = valid_message("servo")
    reply = f.error(request, code, "because")
    assert reply["ok"] is False and reply["re"] == request["seq"]
    assert reply["code"] == code.value and type(reply["code"]) is str and reply["reason"] == "because"
    got = decode_valid(encode(reply))
    assert ErrorCode(got["code"]) is code and got["reason"] == "because"


@pytest.mark.parametrize("request_", [None, {}, {"seq": "3"}, {"seq": True}, {"seq": False}, {"seq": 2.0},
                                      {"seq": None}, [1], "seq", b"\x00", 5])
def test_reply_to_junk_has_re_minus_one(request_):
    f = MessageFactory()
    assert f.ok(request_)["re"] == -1
    reply = f.error(request_, ErrorCode.BAD_ENCODING, "junk")
    assert reply["re"] == -1
    decode_valid(encode(reply))


def test_error_codes_are_distinct_wire_strings():
    values = [c.value for c in ErrorCode]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and " " not in v for v in values)
    err = ProtocolError(ErrorCode.BAD_TYPE, "why")
    assert err.code is ErrorCode.BAD_TYPE and err.reason == "why" and str(err) == "bad_type: why"


@pytest.mark.parametrize("version", ["1", "1.0", "1.x", "1.99", "1.0.3", PROTOCOL_VERSION])
def test_hello_version_accepted(version):
    check_hello_version(version)


@pytest.mark.parametrize("version", ["2.0", "2", "0.9", "0", "10.0", "11.0", "-1.0", "abc", "", ".1", "x.1", "v1.0",
                                     "1e0", "one"])
def test_hello_version_refused(version):
    rejects(ErrorCode.VERSION_MISMATCH, check_hello_version, version)


@given(major=st.integers(0, 10**6).filter(lambda m: m != PROTOCOL_MAJOR), minor=st.integers(0, 99))
def test_hello_other_majors_refused(major, minor):
    err = rejects(ErrorCode.VERSION_MISMATCH, check_hello_version, f"{major}.{minor}")
    assert PROTOCOL_VERSION in err.reason


def test_hello_message_round_trip():
    f = MessageFactory()
    hello = f.make("hello", version=PROTOCOL_VERSION, role="inference", name="policy-0",
                   description={"joint_names": ["a", "b"], "lower": np.array([-1.0, -2.0]), "rate": 500.0})
    got = decode_valid(encode(hello))
    check_hello_version(got["version"])
    assert_same(hello, got)
