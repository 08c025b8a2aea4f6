"""The sim control socket: reset a task with a seed, read the whole scene state.

The sim driver's backend binds a zmq ROUTER socket (``SimControlServer``, polled without blocking
once per control tick, in the driver's control thread; replies go out without blocking too, so a
client that floods requests and never reads its replies cannot stall the tick, as it could a REP).
Experts and the eval harness talk to it with ``SimControl`` (a REQ socket with a timeout, reopened after one: a REQ socket that missed its reply
cannot send again). Requests and replies are msgpack maps, decoded within size limits; nothing else
is ever decoded. Bad input is answered ``{"ok": false, "error": ...}`` and changes nothing.

    {"cmd": "reset", "task": str, "seed": int} -> {"ok": true, "objects": {name: [x, y, z, qw, qx, qy, qz]}}
    {"cmd": "state"} -> {"ok": true, **world.state(), "objects": {...}, "tasks": [...]}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import msgpack
import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from armada.drivers.sim.world import SimWorld
    from armada.runtime.transport import _IpcFile

MAX_REQUEST_BYTES = 4096  # a request is a few short fields
MAX_REPLY_BYTES = 1 << 20  # a state: ~30 floats per object and the qpos


class SimControlError(RuntimeError):
    """The sim answered ``ok: false`` (the message says why) or sent something unreadable."""


class _Reset(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    cmd: Literal["reset"]
    task: str = Field(max_length=64)
    seed: int = Field(ge=0, lt=2**63)


class _State(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    cmd: Literal["state"]


def _decode(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise ValueError(f"message of {len(raw)} bytes exceeds {max_bytes}")
    try:
        msg = msgpack.unpackb(raw, raw=False, max_str_len=max_bytes, max_bin_len=max_bytes,
                              max_array_len=max_bytes, max_map_len=max_bytes, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ValueError(f"not a valid msgpack message: {exc}") from None
    if not isinstance(msg, dict):
        raise ValueError(f"message must be a map, got {type(msg).__name__}")
    return msg


def handle_request(world: "SimWorld", raw: bytes) -> dict[str, Any]:
    """Answer one request on ``world``: a reply map, never an exception; a bad request changes nothing."""
    try:
        msg = _decode(raw, MAX_REQUEST_BYTES)
        cmd = msg.get("cmd")
        if cmd == "reset":
            req = _Reset.model_validate(msg)
            world.reset(req.task, req.seed)  # raises ValueError before changing anything on a bad task
            return {"ok": True, "objects": world.objects()}
        if cmd == "state":
            _State.model_validate(msg)
            from armada.drivers.sim.world import tasks_for

            return {"ok": True, **world.state(), "objects": world.objects(), "tasks": tasks_for(world.scene)}
        return {"ok": False, "error": f"unknown cmd {cmd!r}; known: reset, state"}
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors())
        return {"ok": False, "error": f"bad request: {problems}"}
    except ValueError as exc:
        return {"ok": False, "error": str(exc)}


class SimControlServer:
    """The server end, owned by the backend. ``poll`` answers at most one request and never blocks."""

    def __init__(self, endpoint: str, world: "SimWorld", ctx: zmq.Context | None = None):
        from armada.runtime.transport import _bind

        self.endpoint, self.world = endpoint, world
        self._ctx = ctx or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)  # zmq drops larger ones unread
        self._ipc: _IpcFile | None = None
        try:
            self._ipc = _bind(self._sock, endpoint)
        except OSError:
            self._sock.close(0)
            raise
        self.answered = 0

    def poll(self) -> bool:
        """Answer one waiting request, if any. True when one was answered."""
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        # A REQ client's request arrives as [identity, b"", payload]; anything else is not ours.
        if len(frames) != 3 or frames[1] != b"":
            return False
        reply = handle_request(self.world, frames[2])
        try:  # dropped when that client's queue is full (it is not reading): never wait for it
            self._sock.send_multipart([frames[0], b"", msgpack.packb(reply, use_bin_type=True)], zmq.NOBLOCK)
        except zmq.Again:
            return True
        self.answered += 1
        return True

    def close(self) -> None:
        from armada.runtime.transport import _close

        _close(self._sock, self._ipc)


class SimControl:
    """The REQ end, for experts and the eval harness: ``reset``, ``state``, ``close``."""

    def __init__(self, endpoint: str, timeout_s: float = 2.0, ctx: zmq.Context | None = None):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def reset(self, task: str, seed: int) -> dict[str, list[float]]:
        """Place ``task``'s objects from ``seed``; returns the objects (the arm does not move)."""
        return self._call({"cmd": "reset", "task": task, "seed": int(seed)})["objects"]

    def state(self) -> dict[str, Any]:
        """The sim's state: task, seed, time_s, qpos, success, resets, objects, tasks."""
        reply = self._call({"cmd": "state"})
        reply.pop("ok", None)
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "SimControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        sock = self._socket()
        sock.send(msgpack.packb(msg, use_bin_type=True))
        if not sock.poll(int(self.timeout_s * 1000), zmq.POLLIN):
            self.close()  # a REQ socket that missed its reply cannot send again: reopen next call
            raise TimeoutError(f"sim control {self.endpoint}: no answer to {msg['cmd']!r} within {self.timeout_s} s "
                               "(is the sim driver running?)")
        try:
            reply = _decode(sock.recv(), MAX_REPLY_BYTES)
        except ValueError as exc:
            self.close()
            raise SimControlError(f"sim control {self.endpoint}: unreadable reply: {exc}") from None
        if not reply.get("ok"):
            raise SimControlError(f"sim control {self.endpoint}: {msg['cmd']} refused: {reply.get('error')}")
        return reply

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
            self._sock.connect(self.endpoint)
        return self._sock
