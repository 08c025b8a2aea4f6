"""A scriptable stand-in for a driver, shared by the inference tests (this module holds no tests).

It speaks the driver's protocol over real ZeroMQ sockets (ROUTER for commands, PUB for state),
records who sent what (the ROUTER identity of every request), and can be told to go silent or
to mix garbage into its state stream, which a real driver cannot be made to do on demand.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import zmq

from armada.runtime.config import load_embodiment
from armada.runtime.protocol import PROTOCOL_VERSION, ErrorCode
from armada.runtime.transport import CommandServer, Publisher


class FakeDriver:
    def __init__(self, ctx: zmq.Context, cmd: str, state: str, embodiment: str = "mock_arm", rate_hz: float = 200.0):
        self.emb = load_embodiment(embodiment)
        self.server = CommandServer(ctx, cmd)
        self.pub = Publisher(ctx, state)
        self.rate_hz = rate_hz
        self.mode = "idle"
        self.lease: str | None = None
        self.requests: list[tuple[float, str, bytes]] = []  # (monotonic, kind, ROUTER identity)
        self.silent = threading.Event()  # no state, no replies: a hung or dead driver
        self.garbage = threading.Event()  # publish wrong kinds and shapes next to every state
        self.late_replies = 0  # the next this many trajectories are refused as late (the driver's clock says so)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fake-driver")
        self._thread.start()

    # ------------------------------------------------------------------ what the tests read

    def kinds(self) -> list[str]:
        return [k for _, k, _ in self.requests]

    def times(self, kind: str) -> list[float]:
        return [t for t, k, _ in self.requests if k == kind]

    def identities(self, *kinds: str) -> set[bytes]:
        return {i for _, k, i in self.requests if k in kinds}

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        next_state = time.monotonic()
        while not self._stop.is_set():
            if self.server.poll(0.002) and not self.silent.is_set():
                for _ in range(16):
                    req = self.server.recv()
                    if req is None:
                        break
                    self._serve(req)
            if time.monotonic() >= next_state and not self.silent.is_set():
                next_state += 1.0 / self.rate_hz
                self._publish()

    def _publish(self) -> None:
        q = (self.emb.lower + self.emb.upper) / 2
        fields = dict(mono_ns=time.monotonic_ns(), mode=self.mode, measured=q, requested=q, commanded=q,
                      velocity=np.zeros_like(q), counters={})
        if self.garbage.is_set():
            self.pub.publish("event", event="not a state", data={})
            self.pub.publish("state", **(fields | {"measured": np.zeros(len(q) + 3), "commanded": np.zeros(1)}))
        self.pub.publish("state", **fields)

    def _serve(self, req: Any) -> None:
        if req.error is not None:
            self.server.reply_error(req, req.error.code, req.error.reason)
            return
        msg = req.msg
        self.requests.append((time.monotonic(), msg["kind"], req.identity))
        kind = msg["kind"]
        if "lease" in msg and kind != "acquire" and msg["lease"] != self.lease:
            self.server.reply_error(req, ErrorCode.NO_LEASE, "no_lease: not the lease holder")
            return
        if kind == "hello":
            self.server.reply_ok(req, version=PROTOCOL_VERSION, mode=self.mode, description=self.emb.describe())
        elif kind == "ping":
            self.server.reply_ok(req, mono_ns=time.monotonic_ns(), mode=self.mode, disarming=False)
        elif kind == "acquire":
            self.lease = f"lease-{len(self.requests)}"
            self.server.reply_ok(req, lease=self.lease, ttl_s=0.3)
        elif kind == "release":
            self.lease = None
            self.mode = "armed" if self.mode == "running" else self.mode
            self.server.reply_ok(req)
        elif kind in ("arm", "disarm"):
            self.mode = "armed" if kind == "arm" else "idle"
            self.server.reply_ok(req, mode=self.mode)
        elif kind == "trajectory" and self.late_replies > 0:
            self.late_replies -= 1
            self.server.reply_error(req, ErrorCode.LATE, "every point of the chunk is already in the past")
        elif kind == "trajectory":
            self.mode = "running"
            self.server.reply_ok(req, dropped=0)
        elif kind == "heartbeat":
            self.server.reply_ok(req, mode=self.mode)
        elif kind == "stats":
            self.server.reply_ok(req, counters={"ticks": 0, "overruns": 0, "starved_ticks": 0, "lease_lost": 0},
                                 clamps={})
        else:
            self.server.reply_error(req, ErrorCode.UNKNOWN_KIND, f"fake driver does not do {kind}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.server.close()
        self.pub.close()
