"""The policy kind ``remote``: the cell's model calls go to a model service (``armada serve``).

Only ``route`` (t=0) and ``infer`` leave the cell. Observation building, staleness, chunk
scheduling, latency compensation, the lease and the episode stay in the cell's inference
process, which calls this policy like any other (with its deadlines, runtime/inference/deadline.py).

Each request carries its deadline: an infer waits at most ``timeout_s`` (by default the span of
a chunk, beyond which every point of the chunk would be past). A request that fails for a
reason another replica may not share (connection refused or reset, a timeout, HTTP 5xx: a
replica killed mid-request) is sent again, for at most ``failover_s``; Serve routes it to a live
replica. Meanwhile the arm holds, exactly as for a slow policy: its chunk runs out and the driver
holds the last point, the lease kept by the episode loop. A retried infer answers for an old
observation, so its chunk is usually late: the episode skips it (counted) and infers again from
a fresh one. Past ``failover_s`` the call raises PolicyError: the episode fails naming the
service, the leases are released and the drivers hold. A 4xx answer is a bug or a bad cell,
not a dead replica: PolicyError at once, with the service's reason.

What happened is in ``episode_notes()`` (failures, failovers, the time held, replicas seen) and
in the inference log. No ray here: plain HTTP (http.client) and msgpack.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from armada.runtime.config import StrictModel
from armada.runtime.fleet.wire import (CONTENT_TYPE, ModelRequest, WireError, decode_chunk_reply,
                                       decode_route_reply)
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace, Chunk, Policy, PolicyError, RouteResult
from armada.runtime.inference.registry import PolicyPlugin

if TYPE_CHECKING:
    from armada.runtime.config import CellConfig

log = logging.getLogger("armada.inference")

RETRY_PAUSE_S = 0.05
MAX_RETRY_PAUSE_S = 0.8
MAX_REPLY_BYTES = 1024 * 1024
RETRYABLE_STATUS = (500, 502, 503, 504)


class RemotePolicyConfig(StrictModel):
    kind: Literal["remote"] = "remote"
    # The service, e.g. http://127.0.0.1:8000 (what `armada serve` prints), or https://gpu-host behind a
    # TLS proxy (the server's certificate is verified against the system's CAs).
    url: str
    # Chunks are arm commands: plain HTTP to another host lets anyone on the network send them (armada
    # refuses plain tcp between hosts elsewhere too). Off this host, use https, or an SSH tunnel to a
    # 127.0.0.1 port, or say so here for a trusted, isolated network.
    plain_http_off_host: bool = False
    # One infer request's deadline; None: the chunk's span (a later chunk would be all past), at least 0.2 s.
    timeout_s: float | None = Field(default=None, gt=0, le=60)
    route_timeout_s: float = Field(default=30.0, gt=0, le=600)  # the first request may wait for a replica to warm
    # How long a failing call is retried on another replica before the episode fails; None: just
    # under the cell's policy deadline.
    failover_s: float | None = Field(default=None, ge=0, le=600)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be http://host:port or https://host[:port], got {url!r}")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _plain_http_stays_on_this_host(self) -> "RemotePolicyConfig":
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme == "http" and not _loopback(parts.hostname or "") and not self.plain_http_off_host:
            raise ValueError(f"url {self.url} is plain HTTP to another host: unencrypted and unauthenticated, anyone "
                             "on that network could send this cell's arms chunks. Use https:// (a TLS proxy in front "
                             "of `armada serve`), an SSH tunnel to a 127.0.0.1 port, or set plain_http_off_host: "
                             "true on a trusted, isolated network")
        return self


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServiceNotes:
    """What the service did during one episode (the episode report's ``policy`` notes)."""

    url: str = ""
    requests: int = 0
    failures: int = 0  # requests that failed and were retried
    failovers: int = 0  # calls that succeeded after at least one failure
    held_s: float = 0.0  # time spent retrying: the arm held meanwhile
    replicas: list[str] = field(default_factory=list)
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.url, "requests": self.requests, "failures": self.failures,
                "failovers": self.failovers, "held_s": round(self.held_s, 3), "replicas": list(self.replicas),
                "last_error": self.last_error}


class RemotePolicy(Policy):
    def __init__(self, url: str, timeout_s: float, route_timeout_s: float, failover_s: float, client: str = ""):
        parts = urllib.parse.urlsplit(url)
        self.tls = parts.scheme == "https"
        self.url, self.host, self.port = url, parts.hostname or "", parts.port or (443 if self.tls else 80)
        self.timeout_s, self.route_timeout_s, self.failover_s = timeout_s, route_timeout_s, failover_s
        self.client = client
        self._conn: http.client.HTTPConnection | None = None
        self._dim: int | None = None
        self._task: str | None = None
        self._instruction = ""
        self.notes = ServiceNotes(url)

    # ------------------------------------------------------------------ Policy

    def reset(self, space: ActionSpace) -> None:
        self._dim = len(space.names)
        self._task = None
        self.notes = ServiceNotes(self.url)

    def route(self, obs: Observation, instruction: str, pinned_task: str | None = None) -> RouteResult:
        req = ModelRequest("route", instruction, obs.state, obs.frames, pinned_task,
                           self.route_timeout_s * 1e3, self.client)
        raw = self._post("/route", req, self.route_timeout_s, "route")
        try:
            reply = decode_route_reply(raw)
        except WireError as exc:
            raise PolicyError(f"model service {self.url}: {exc.reason}") from None
        self._task, self._instruction = reply.task, instruction
        return RouteResult(reply.task, reply.scores, reply.probabilities, reply.margin)

    def infer(self, obs: Observation) -> Chunk:
        if self._task is None:
            raise PolicyError("infer before route: the episode must route at t=0 first")
        req = ModelRequest("infer", self._instruction, obs.state, obs.frames, self._task, self.timeout_s * 1e3,
                           self.client)
        raw = self._post("/infer", req, self.timeout_s, "infer")
        try:
            reply = decode_chunk_reply(raw, self._dim)
        except WireError as exc:
            raise PolicyError(f"model service {self.url}: {exc.reason}") from None
        replica = str(reply.info.get("replica", ""))
        if replica and replica not in self.notes.replicas and len(self.notes.replicas) < 16:
            self.notes.replicas.append(replica)
        return Chunk(reply.actions, reply.dt)

    def episode_notes(self) -> dict[str, Any]:
        return self.notes.as_dict()

    # ------------------------------------------------------------------ HTTP

    def _post(self, path: str, req: ModelRequest, timeout_s: float, what: str) -> bytes:
        started = time.monotonic()
        end = started + self.failover_s
        tries = timeouts = 0
        while True:
            tries += 1
            self.notes.requests += 1
            # A slow service is not a dead one: after each timeout the next attempt waits twice as
            # long (and the pause before it grows), so an overloaded service is not flooded with
            # re-sent requests; a refused connection or a 5xx is re-sent after a short pause.
            attempt_s = timeout_s * 2 ** timeouts
            if tries > 1:  # never past the failover window by more than a short attempt
                attempt_s = min(attempt_s, max(0.05, end - time.monotonic()))
            # The body carries this attempt's deadline: the service drops a request that waited
            # in its queue past it, and a retry that waits longer must not be dropped at the first's.
            body = dataclasses.replace(req, deadline_ms=attempt_s * 1e3).encode()
            try:
                raw = self._once(path, body, attempt_s)
            except _Retryable as exc:
                self._close()
                self.notes.failures += 1
                self.notes.last_error = str(exc)
                pause = RETRY_PAUSE_S
                if exc.timed_out:
                    pause = min(MAX_RETRY_PAUSE_S, RETRY_PAUSE_S * 2 ** timeouts)
                    timeouts += 1
                if tries == 1:
                    log.warning("model service %s: %s %s; the arm holds while it is sent again (for up to %.1f s)",
                                self.url, what, exc, self.failover_s)
                if time.monotonic() + pause >= end:
                    self.notes.held_s += time.monotonic() - started
                    raise PolicyError(f"the model service at {self.url} did not answer {what} within "
                                      f"{self.failover_s:.1f} s ({tries} tries; last: {exc}); the arm held. "
                                      "Check that `armada serve` runs and has a live replica") from None
                time.sleep(pause)
                continue
            except WireError as exc:
                raise PolicyError(f"the model service at {self.url} refused {what}: {exc.reason}") from None
            if tries > 1:
                held = time.monotonic() - started
                self.notes.failovers += 1
                self.notes.held_s += held
                log.warning("model service %s: %s answered again after %.2f s and %d tries", self.url, what, held, tries)
            return raw

    def _once(self, path: str, body: bytes, timeout_s: float) -> bytes:
        try:
            if self._conn is None:
                if self.tls:
                    import ssl

                    self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout_s,
                                                             context=ssl.create_default_context())
                else:
                    self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
            conn = self._conn
            conn.timeout = timeout_s
            if conn.sock is not None:
                conn.sock.settimeout(timeout_s)  # a kept-alive connection: the deadline of this request
            conn.request("POST", path, body, {"Content-Type": CONTENT_TYPE})
            reply = conn.getresponse()
            raw = reply.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, cut short
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _Retryable(text, timed_out=isinstance(exc, TimeoutError)) from None
        if reply.status in RETRYABLE_STATUS:  # 504: it waited in the service's queue past its deadline
            raise _Retryable(f"HTTP {reply.status}: {_text(raw)}", timed_out=reply.status == 504)
        if reply.status != 200:
            raise WireError(reply.status, f"HTTP {reply.status}: {_text(raw)}")
        if len(raw) > MAX_REPLY_BYTES:
            raise WireError(502, f"the reply exceeds {MAX_REPLY_BYTES} bytes")
        return raw

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Retryable(Exception):
    """A failure another replica may not have: send the request again."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out  # slow rather than dead: back off


def _text(raw: bytes) -> str:
    return raw[:300].decode("utf-8", "replace").strip() or "(no message)"


def _build(cell: "CellConfig") -> RemotePolicy:
    from armada.runtime.inference.process import deadlines  # the cell's policy deadlines, one definition

    p, c = cell.inference.policy, cell.inference.chunking
    timeout_s = p.timeout_s or max(c.size * c.dt, 0.2)
    failover_s = p.failover_s if p.failover_s is not None else max(0.0, deadlines(cell).policy_s - 0.25)
    return RemotePolicy(p.url, timeout_s, p.route_timeout_s, failover_s, client=cell.name)


# Registered under ``armada.policies`` in pyproject.toml (kind ``remote``). needs_model: the first
# call may wait for a replica to start, so it gets the longer first deadline.
PLUGIN = PolicyPlugin(kind="remote", config_model=RemotePolicyConfig, build=_build, needs_model=True)
