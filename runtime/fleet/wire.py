"""What travels between a cell's ``remote`` policy and the model service, over HTTP.

Both directions are msgpack maps packed by runtime/protocol.py: arrays as raw little-endian
buffers in the ndarray extension, nothing pickled, every size and count bounded before and while
it is decoded. A request is refused with an HTTP status and a one-line reason (``WireError``);
the service changes nothing for a refused request.

Requests (POST ``/route`` and ``/infer``)::

    {"v": 1, "op": "route"|"infer", "client": str, "instruction": str, "task": str|None,
     "state": float64 (A,), "frames": {camera: uint8 (H, W, 3)}, "deadline_ms": float}

``task`` is the pinned task for ``route`` (None: the router picks) and the routed task for
``infer`` (required: the service keeps no episode state, so any replica can answer any request).
``deadline_ms``: how long the cell waits; a request that waited longer in the service's queue is
answered 504 without running the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from armada.runtime.protocol import (MAX_ARRAY_BYTES, MAX_MESSAGE_BYTES, MAX_STR_LEN, Limits, ProtocolError, decode,
                                     encode, short_repr)

WIRE_VERSION = 1
OPS = ("route", "infer")
MAX_CAMERAS = 8
MAX_STATE = 64  # joints of a whole cell
MAX_DEADLINE_MS = 600_000.0
CONTENT_TYPE = "application/msgpack"

# A request: a few scalars, a state vector and up to MAX_CAMERAS frames of at most 2 MiB each
# (a 640x480 RGB frame is 0.9 MiB); the whole body at most the protocol's 4 MiB.
REQUEST_LIMITS = Limits(max_bytes=MAX_MESSAGE_BYTES, max_containers=4, max_container_len=16, max_depth=3,
                        max_exts=MAX_CAMERAS + 1, max_array_bytes=MAX_ARRAY_BYTES, max_str_len=MAX_STR_LEN,
                        max_bin_len=0)
# A reply: an action chunk and the router's scores per task.
REPLY_LIMITS = Limits(max_bytes=512 * 1024, max_containers=16, max_container_len=64, max_depth=4, max_exts=4,
                      max_array_bytes=256 * 1024, max_bin_len=0)


class WireError(Exception):
    """A request or reply that cannot be used: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class ModelRequest:
    op: str
    instruction: str
    state: np.ndarray
    frames: dict[str, np.ndarray]
    task: str | None = None
    deadline_ms: float = 1000.0
    client: str = ""

    def encode(self) -> bytes:
        return encode({"v": WIRE_VERSION, "op": self.op, "client": self.client, "instruction": self.instruction,
                       "task": self.task, "state": np.ascontiguousarray(self.state, np.float64),
                       "frames": self.frames, "deadline_ms": float(self.deadline_ms)})


@dataclass(frozen=True)
class RouteReply:
    task: str
    scores: dict[str, float]
    probabilities: dict[str, float]
    margin: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkReply:
    actions: np.ndarray  # (n, A) float64
    dt: float
    task: str
    info: dict[str, Any] = field(default_factory=dict)  # replica, batch size, model and queue times


def decode_request(raw: bytes) -> ModelRequest:
    """A request body, checked field by field; WireError(400 or 413) says what is wrong."""
    try:
        msg = decode(raw, REQUEST_LIMITS)
    except ProtocolError as exc:
        raise WireError(413 if exc.code == "too_large" else 400, f"request body: {exc.reason}") from None
    if msg.get("v") != WIRE_VERSION:
        raise WireError(400, f"request version {short_repr(msg.get('v'))} is not supported (the service speaks "
                             f"{WIRE_VERSION})")
    op = msg.get("op")
    if op not in OPS:
        raise WireError(400, f"op must be one of {', '.join(OPS)}, got {short_repr(op)}")
    instruction, client, task = msg.get("instruction"), msg.get("client", ""), msg.get("task")
    if not isinstance(instruction, str):
        raise WireError(400, "instruction must be a string")
    if not isinstance(client, str):
        raise WireError(400, "client must be a string")
    if task is not None and not isinstance(task, str):
        raise WireError(400, "task must be a string or nil")
    if op == "infer" and not task:
        raise WireError(400, "infer needs the routed task (route first)")
    deadline = msg.get("deadline_ms")
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline) \
            or not 0 < deadline <= MAX_DEADLINE_MS:
        raise WireError(400, f"deadline_ms must be a number in (0, {MAX_DEADLINE_MS:.0f}], got {short_repr(deadline)}")
    state = msg.get("state")
    if not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind != "f" or not 0 < state.size <= MAX_STATE:
        raise WireError(400, f"state must be a float vector of 1..{MAX_STATE} values, got {_describe(state)}")
    if not np.all(np.isfinite(state)):
        raise WireError(400, "state contains NaN or infinity")
    frames = msg.get("frames")
    if not isinstance(frames, dict) or not 0 < len(frames) <= MAX_CAMERAS:
        raise WireError(400, f"frames must be a map of 1..{MAX_CAMERAS} cameras, got {_describe(frames)}")
    for name, frame in frames.items():
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 \
                or min(frame.shape[:2]) < 1:
            raise WireError(400, f"frame {short_repr(name)} must be (H, W, 3) uint8 RGB, got {_describe(frame)}")
    return ModelRequest(op, instruction, state.astype(np.float64), frames, task, float(deadline), client)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    return short_repr(value)


def encode_route_reply(reply: RouteReply) -> bytes:
    return encode({"v": WIRE_VERSION, "ok": True, "task": reply.task, "scores": reply.scores,
                   "probabilities": reply.probabilities, "margin": float(reply.margin), "info": reply.info})


def encode_chunk_reply(reply: ChunkReply) -> bytes:
    return encode({"v": WIRE_VERSION, "ok": True, "actions": np.ascontiguousarray(reply.actions, np.float64),
                   "dt": float(reply.dt), "task": reply.task, "info": reply.info})


def _reply(raw: bytes) -> dict[str, Any]:
    try:
        msg = decode(raw, REPLY_LIMITS)
    except ProtocolError as exc:
        raise WireError(502, f"the service's reply: {exc.reason}") from None
    if msg.get("v") != WIRE_VERSION or msg.get("ok") is not True:
        raise WireError(502, f"the service's reply is not a version {WIRE_VERSION} answer")
    info = msg.get("info", {})
    if not isinstance(info, dict):
        raise WireError(502, "the service's reply: info must be a map")
    return msg


def decode_route_reply(raw: bytes) -> RouteReply:
    msg = _reply(raw)
    task, scores, probs, margin = msg.get("task"), msg.get("scores"), msg.get("probabilities"), msg.get("margin")
    if not isinstance(task, str) or not isinstance(scores, dict) or not isinstance(probs, dict) \
            or isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise WireError(502, "the service's route reply lacks task, scores, probabilities or margin")
    return RouteReply(task, {str(k): float(v) for k, v in scores.items()},
                      {str(k): float(v) for k, v in probs.items()}, float(margin), msg.get("info", {}))


def decode_chunk_reply(raw: bytes, action_dim: int | None = None) -> ChunkReply:
    msg = _reply(raw)
    actions, dt, task = msg.get("actions"), msg.get("dt"), msg.get("task")
    if not isinstance(actions, np.ndarray) or actions.ndim != 2 or actions.dtype.kind != "f" or actions.shape[0] < 1:
        raise WireError(502, f"the service's chunk must be an (n, A) float array, got {_describe(actions)}")
    if action_dim is not None and actions.shape[1] != action_dim:
        raise WireError(502, f"the service's chunk has {actions.shape[1]} action values, the cell takes {action_dim}")
    if not np.all(np.isfinite(actions)):
        raise WireError(502, "the service's chunk contains NaN or infinity")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 1e-4 <= dt <= 10.0:
        raise WireError(502, f"the service's chunk dt must be in [1e-4, 10] s, got {short_repr(dt)}")
    return ChunkReply(actions.astype(np.float64), float(dt), str(task), msg.get("info", {}))
