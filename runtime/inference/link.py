"""The inference side of one driver: handshake, clock offset, lease, heartbeats, chunks.

Kept tiny on purpose (openpi's client is the model): every call has a timeout and raises a
clear error; nothing here decides policy.

One connection: the driver binds the lease to the connection that acquired it, so acquire,
heartbeats and leased commands all go over one DEALER socket. ZeroMQ sockets are not
thread-safe, so the episode thread and the heartbeat thread take turns under a lock; a request
holds the lock for at most its own timeout, so waiting for the lock is bounded too.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq

from armada.runtime.config import CurveConfig, DriverConfig
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.transport import CommandClient, RemoteError, Subscriber

log = logging.getLogger("armada.inference")

Alive = Callable[[], bool]


class DriverLink:
    def __init__(self, ctx: zmq.Context, cfg: DriverConfig, curve: CurveConfig | None, timeout_s: float = 1.0):
        self.name = cfg.name
        self.ctx, self.cfg, self.curve = ctx, cfg, curve
        self.timeout_s = timeout_s
        self.cmd = CommandClient(ctx, cfg.cmd, curve, default_timeout_s=timeout_s)
        self._cmd_lock = threading.Lock()
        self.state = Subscriber(ctx, cfg.state, curve, hwm=100)
        self.description: dict[str, Any] = {}
        self.offset_ns = 0  # driver monotonic minus ours
        self.lease: str | None = None
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        self.heartbeat_error: str | None = None
        self.heartbeats_withheld = 0  # beats not sent because the episode loop stopped making progress

    def request(self, kind: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request over the shared connection; raises TimeoutError within about twice its timeout."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        # Whoever holds the lock is inside a request bounded by its own timeout.
        if not self._cmd_lock.acquire(timeout=timeout_s + self.timeout_s):
            raise TimeoutError(f"driver {self.name}: {kind} could not use the connection within "
                               f"{timeout_s + self.timeout_s:.1f} s (another request holds it)")
        try:
            return self.cmd.request(kind, timeout_s=timeout_s, **fields)
        finally:
            self._cmd_lock.release()

    def handshake(self, timeout_s: float = 2.0) -> dict[str, Any]:
        reply = self.request("hello", timeout_s=timeout_s, version=PROTOCOL_VERSION, role="inference")
        self.description = reply["description"]
        return reply

    @property
    def dof(self) -> int:
        return int(self.description["action_dim"])

    def ping(self) -> dict[str, Any]:
        return self.request("ping")

    def sync_clock(self, samples: int = 10) -> float:
        """Estimate the driver's clock offset from the lowest-round-trip ping; returns that RTT (s)."""
        best_rtt, best_offset = None, 0
        for _ in range(samples):
            sent = time.monotonic_ns()
            driver_ns = self.ping()["mono_ns"]
            received = time.monotonic_ns()
            rtt = received - sent
            if best_rtt is None or rtt < best_rtt:
                best_rtt, best_offset = rtt, driver_ns - (sent + received) // 2
        self.offset_ns = best_offset
        return (best_rtt or 0) * 1e-9

    def to_driver_ns(self, local_mono_ns: int) -> int:
        return local_mono_ns + self.offset_ns

    def acquire(self, client: str, ttl_s: float | None = None) -> None:
        fields = {"client": client} | ({"ttl_s": ttl_s} if ttl_s else {})
        self.lease = self.request("acquire", **fields)["lease"]

    def command(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A command that needs the lease."""
        if self.lease is None:
            raise RuntimeError(f"driver {self.name}: {kind} needs the lease; acquire first")
        return self.request(kind, lease=self.lease, **fields)

    def mode(self) -> str:
        return self.ping()["mode"]

    def send_chunk(self, t0_driver_ns: int, dt: float, points: np.ndarray, merge: str, episode: int,
                   chunk: int, final: bool) -> dict[str, Any]:
        return self.command("trajectory", t0_ns=int(t0_driver_ns), dt=float(dt), points=points, merge=merge,
                            episode=episode, chunk=chunk, final=final)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    # ------------------------------------------------------------------ heartbeats

    def start_heartbeat(self, period_s: float, alive: Alive) -> None:
        """Keep the lease alive from a thread of its own, but only while ``alive()`` says the
        episode is making progress: a hung episode loop must lose the lease, not keep it."""
        self._heartbeat_stop.clear()
        self.heartbeat_error = None
        self._heartbeat = threading.Thread(target=self._beat, args=(period_s, alive), daemon=True,
                                           name=f"heartbeat-{self.name}")
        self._heartbeat.start()

    def _beat(self, period_s: float, alive: Alive) -> None:
        timeout_s = max(period_s, 0.2)
        while not self._heartbeat_stop.wait(period_s):
            lease = self.lease
            if lease is None:
                continue
            if not alive():
                self.heartbeats_withheld += 1
                if self.heartbeats_withheld == 1:
                    log.warning("driver %s: the episode loop stopped making progress; heartbeats withheld so "
                                "the lease lapses and the arm holds", self.name)
                continue
            try:
                self.request("heartbeat", timeout_s=timeout_s, lease=lease)
            except (TimeoutError, RemoteError) as exc:
                if self.lease == lease:  # a refusal of a token given up meanwhile (intervention) is no news
                    self.heartbeat_error = str(exc)

    def stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2.0)
            self._heartbeat = None

    def close(self) -> None:
        self.stop_heartbeat()
        # A heartbeat still inside a request would use the socket while it closes: wait for it.
        if self._cmd_lock.acquire(timeout=2 * self.timeout_s):
            self._cmd_lock.release()
        self.cmd.close()
        self.state.close()
