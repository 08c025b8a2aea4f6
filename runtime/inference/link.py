"""The inference side of one driver: handshake, clock offset, lease, heartbeats, chunks.

Kept tiny on purpose (openpi's client is the model): every call has a timeout and raises a
clear error; nothing here decides policy.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import zmq

from runtime.config import CurveConfig, DriverConfig
from runtime.protocol import PROTOCOL_VERSION
from runtime.transport import CommandClient, RemoteError, Subscriber


class DriverLink:
    def __init__(self, ctx: zmq.Context, cfg: DriverConfig, curve: CurveConfig | None, timeout_s: float = 1.0):
        self.name = cfg.name
        self.ctx, self.cfg, self.curve = ctx, cfg, curve
        self.cmd = CommandClient(ctx, cfg.cmd, curve, default_timeout_s=timeout_s)
        self.state = Subscriber(ctx, cfg.state, curve, hwm=100)
        self.description: dict[str, Any] = {}
        self.offset_ns = 0  # driver monotonic minus ours
        self.lease: str | None = None
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        self.heartbeat_error: str | None = None

    def handshake(self, timeout_s: float = 2.0) -> dict[str, Any]:
        reply = self.cmd.request("hello", timeout_s=timeout_s, version=PROTOCOL_VERSION, role="inference")
        self.description = reply["description"]
        return reply

    @property
    def dof(self) -> int:
        return int(self.description["action_dim"])

    def sync_clock(self, samples: int = 10) -> float:
        """Estimate the driver's clock offset from the lowest-round-trip ping; returns that RTT (s)."""
        best_rtt, best_offset = None, 0
        for _ in range(samples):
            sent = time.monotonic_ns()
            driver_ns = self.cmd.request("ping")["mono_ns"]
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
        self.lease = self.cmd.request("acquire", **fields)["lease"]

    def command(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A command that needs the lease."""
        if self.lease is None:
            raise RuntimeError(f"driver {self.name}: {kind} needs the lease; acquire first")
        return self.cmd.request(kind, lease=self.lease, **fields)

    def mode(self) -> str:
        return self.cmd.request("ping")["mode"]

    def send_chunk(self, t0_driver_ns: int, dt: float, points: np.ndarray, merge: str, episode: int,
                   chunk: int, final: bool) -> dict[str, Any]:
        return self.command("trajectory", t0_ns=int(t0_driver_ns), dt=float(dt), points=points, merge=merge,
                            episode=episode, chunk=chunk, final=final)

    def stats(self) -> dict[str, Any]:
        return self.cmd.request("stats")

    # ------------------------------------------------------------------ heartbeats

    def start_heartbeat(self, period_s: float) -> None:
        """Keep the lease alive from a thread of its own, so a long inference never loses it."""
        self._heartbeat_stop.clear()
        self.heartbeat_error = None
        self._heartbeat = threading.Thread(target=self._beat, args=(period_s,), daemon=True,
                                           name=f"heartbeat-{self.name}")
        self._heartbeat.start()

    def _beat(self, period_s: float) -> None:
        client = CommandClient(self.ctx, self.cfg.cmd, self.curve, default_timeout_s=max(period_s, 0.2))
        try:
            while not self._heartbeat_stop.wait(period_s):
                try:
                    client.request("heartbeat", lease=self.lease or "")
                except (TimeoutError, RemoteError) as exc:
                    self.heartbeat_error = str(exc)
        finally:
            client.close()

    def stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2.0)
            self._heartbeat = None

    def close(self) -> None:
        self.stop_heartbeat()
        self.cmd.close()
        self.state.close()
