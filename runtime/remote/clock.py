"""Clock offsets of the hosts a cell's streams come from, for the ages of their messages.

Frames and states are stamped with their host's wall clock (``capture_ns``, ``t_ns``); on another
host, that clock is off ours by whatever NTP left (milliseconds; seconds without it). A camera host
whose clock runs behind makes every frame look older than it is (false "stale" pauses); one ahead
hides real staleness behind the future-stamp fallback.

The offset of a driver's host comes from what the link already measures: the ping gives the
driver's monotonic clock against ours (``DriverLink.offset_ns``, lowest round trip), and every state
message carries both clocks of the driver host at one instant (``t_ns``, ``mono_ns``), so

    wall offset = mono offset + (their wall - their mono) - (our wall - our mono).

A camera whose frames come from the same host as a driver (same tcp host in the endpoints) gets
that host's offset; streams over ipc/inproc are on this host (no offset); a camera on a host with
no driver gets its host's offset from clock pings it answers itself (``CameraClocks``, below), or,
if it names no clock endpoint, keeps its stamps as they are (noted in the log once).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import zmq

log = logging.getLogger(__name__)


def endpoint_host(endpoint: str) -> str | None:
    """The host of a tcp:// endpoint; None for ipc/inproc (this host)."""
    if not endpoint.startswith("tcp://"):
        return None
    return urlsplit(endpoint).hostname


def wall_offset_ns(mono_offset_ns: int, state: Mapping[str, Any], now_wall_ns: int | None = None,
                   now_mono_ns: int | None = None) -> int:
    """Their wall clock minus ours, from their mono offset and one state message's two stamps."""
    ours = (time.time_ns() if now_wall_ns is None else now_wall_ns) - (
        time.monotonic_ns() if now_mono_ns is None else now_mono_ns)
    return mono_offset_ns + (int(state["t_ns"]) - int(state["mono_ns"])) - ours


def stream_offsets(links: Mapping[str, Any], states: Mapping[str, Mapping[str, Any]],
                   cameras: Mapping[str, Any]) -> dict[str, int]:
    """{stream name: its sender's wall clock minus ours} for the streams from other hosts whose
    offset is known. ``links``: driver name -> DriverLink (``cfg.cmd``, ``offset_ns``, clock synced);
    ``states``: driver name -> latest state; ``cameras``: camera name -> FrameSubscriber."""
    offsets: dict[str, int] = {}
    by_host: dict[str, int] = {}
    for name, link in links.items():
        host = endpoint_host(link.cfg.cmd)
        state = states.get(name)
        if host is None or state is None or "mono_ns" not in state or "t_ns" not in state:
            continue
        offsets[name] = by_host[host] = wall_offset_ns(link.offset_ns, state)
    for name, sub in cameras.items():
        host = endpoint_host(_connected_endpoint(sub))
        if host is None:
            continue
        if host in by_host:
            offsets[name] = by_host[host]
        else:
            log.debug("camera %s on host %s: no driver there to measure its clock against; its own clock "
                      "pings give the offset if it names a clock endpoint, else its frames' ages trust that "
                      "host's wall clock (keep it NTP-synced: `armada doctor`)", name, host)
    return offsets


def _connected_endpoint(sub: Any) -> str:
    try:
        return sub.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    except (AttributeError, zmq.ZMQError):
        return ""


# --------------------------------------------------------------------------- clock pings of cameras
#
# A camera on a host with no driver has no state stream to carry its host's clocks, so its process
# answers clock pings on an endpoint of its own (``clock:`` in the camera's config): the reply
# carries that host's wall clock, and the ping with the lowest round trip gives the offset the
# NTP way (their stamp against the midpoint of our send and receive). Its error is at most half
# that round trip.

CLOCK_SAMPLES = 8
CLOCK_TIMEOUT_S = 0.5
CLOCK_PERIOD_S = 5.0  # clocks drift by ppm: re-measuring every few seconds is plenty
RETRY_S = 0.5  # a camera whose clock has not answered yet


@dataclass(frozen=True)
class ClockSample:
    offset_ns: int  # their wall clock minus ours
    rtt_ns: int  # the round trip of the ping it came from: the estimate is within rtt/2


def ping_clock(client: Any, samples: int = CLOCK_SAMPLES, timeout_s: float = CLOCK_TIMEOUT_S) -> ClockSample:
    """NTP-style offset of the host behind ``client`` (a CommandClient on a clock endpoint that
    answers ``ping`` with its wall clock ``t_ns``); raises TimeoutError/RemoteError as the client does."""
    best: ClockSample | None = None
    for _ in range(samples):
        sent_mono, sent_wall = time.monotonic_ns(), time.time_ns()
        reply = client.request("ping", timeout_s=timeout_s)
        rtt = time.monotonic_ns() - sent_mono
        their = reply.get("t_ns")
        if type(their) is not int:
            raise ValueError(f"clock ping to {getattr(client, 'endpoint', '?')}: the reply carries no wall clock "
                             "(t_ns): not a camera's clock endpoint nor an inference process")
        sample = ClockSample(their - (sent_wall + rtt // 2), rtt)
        if best is None or sample.rtt_ns < best.rtt_ns:
            best = sample
    assert best is not None, "samples must be at least 1"
    return best


def camera_clock_endpoints(cameras: Iterable[Any]) -> dict[str, str]:
    """{camera name: its clock endpoint} for the cameras that name one on another host (tcp)."""
    out = {}
    for cam in cameras:
        endpoint = cam.clock
        if endpoint and endpoint_host(endpoint) is not None:
            out[cam.name] = endpoint
    return out


class CameraClocks:
    """The wall-clock offsets of camera hosts, measured from a thread every ``period_s``.

    The episode loop never waits for a ping: it reads the latest measurement (``offset_ns``). The
    thread has its own ZeroMQ context, so it can neither block the owner's ``ctx.term()`` nor share a
    socket across threads; it is a daemon: a process exiting without ``close()`` is not held up.
    """

    def __init__(self, endpoints: Mapping[str, str], curve: Any = None, period_s: float = CLOCK_PERIOD_S,
                 samples: int = CLOCK_SAMPLES, timeout_s: float = CLOCK_TIMEOUT_S):
        self.endpoints = dict(endpoints)
        self.curve, self.period_s, self.samples, self.timeout_s = curve, period_s, samples, timeout_s
        self.samples_ns: dict[str, ClockSample] = {}  # replaced whole, never mutated: readers need no lock
        self.errors: dict[str, str] = {}
        self.measured = threading.Event()  # set after the first round (whatever its outcome)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="camera-clocks")
        self._thread.start()

    @classmethod
    def of_cell(cls, cell: Any, **kwargs: Any) -> "CameraClocks | None":
        """Clocks for the cell's cameras that have a clock endpoint on another host; None if none has."""
        endpoints = camera_clock_endpoints(cell.cameras)
        return cls(endpoints, cell.curve, **kwargs) if endpoints else None

    def offset_ns(self, name: str) -> int | None:
        sample = self.samples_ns.get(name)
        return None if sample is None else sample.offset_ns

    def offsets_ns(self) -> dict[str, int]:
        return {name: s.offset_ns for name, s in self.samples_ns.items()}

    def _run(self) -> None:
        from armada.runtime.transport import CommandClient, RemoteError

        ctx = zmq.Context()
        clients = {}
        try:
            while not self._stop.is_set():
                for name, endpoint in self.endpoints.items():
                    if self._stop.is_set():
                        break
                    try:
                        if name not in clients:
                            clients[name] = CommandClient(ctx, endpoint, self.curve, self.timeout_s)
                        sample = ping_clock(clients[name], self.samples, self.timeout_s)
                    except (TimeoutError, RemoteError, ValueError, zmq.ZMQError) as exc:
                        if self.errors.get(name) is None:
                            log.warning("camera %s: no clock offset from %s (%s); its frames' ages keep the last "
                                        "one measured, or trust that host's wall clock", name, endpoint, exc)
                        self.errors = {**self.errors, name: str(exc)}
                        continue
                    if name not in self.samples_ns:
                        log.info("camera %s: its host's clock is %+.1f ms off ours (ping rtt %.1f ms)", name,
                                 sample.offset_ns / 1e6, sample.rtt_ns / 1e6)
                    self.samples_ns = {**self.samples_ns, name: sample}
                    self.errors = {**self.errors, name: None}
                self.measured.set()
                # A camera not measured yet (its process still starting, a link down) is retried soon:
                # until then its frames are aged on its host's stamps, which may pause the episode.
                missing = any(name not in self.samples_ns for name in self.endpoints)
                self._stop.wait(min(self.period_s, RETRY_S) if missing else self.period_s)
        finally:
            for client in clients.values():
                client.close()
            ctx.destroy(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.samples * self.timeout_s * max(1, len(self.endpoints)) + 1.0)


def measure_driver_clock(ctx: zmq.Context, cmd: str, state: str, curve: Any = None, samples: int = CLOCK_SAMPLES,
                         timeout_s: float = 1.0) -> ClockSample:
    """A driver host's wall-clock offset, the way the inference side measures it: the lowest-rtt
    ping gives the driver's monotonic clock against ours, one state message its host's wall and
    monotonic stamps of one instant (``wall_offset_ns``). Raises TimeoutError naming what did not
    answer; every wait is bounded by ``timeout_s``."""
    from armada.runtime.transport import CommandClient, Subscriber

    client = CommandClient(ctx, cmd, curve, default_timeout_s=timeout_s)
    sub = Subscriber(ctx, state, curve, hwm=10)
    try:
        best_rtt, mono_offset = None, 0
        for _ in range(samples):
            sent = time.monotonic_ns()
            their_mono = int(client.request("ping", timeout_s=timeout_s)["mono_ns"])
            rtt = time.monotonic_ns() - sent
            if best_rtt is None or rtt < best_rtt:
                best_rtt, mono_offset = rtt, their_mono - (sent + rtt // 2)
        msg = sub.recv(timeout_s)
        if msg is None or "mono_ns" not in msg or "t_ns" not in msg:
            raise TimeoutError(f"no state on {state} within {timeout_s:g} s")
        return ClockSample(wall_offset_ns(mono_offset, msg), best_rtt or 0)
    finally:
        client.close()
        sub.close()


def measure_pinged_clock(ctx: zmq.Context, clock: str, curve: Any = None, samples: int = CLOCK_SAMPLES,
                         timeout_s: float = 1.0) -> ClockSample:
    """Another host's wall-clock offset from pings answered with that host's clocks (``t_ns`` and
    ``mono_ns``): a camera's clock endpoint, or the inference process's ctl socket."""
    from armada.runtime.transport import CommandClient

    client = CommandClient(ctx, clock, curve, default_timeout_s=timeout_s)
    try:
        return ping_clock(client, samples, timeout_s)
    finally:
        client.close()
