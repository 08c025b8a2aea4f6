"""The model service: the merged bundle as a Ray Serve deployment, reached over Serve's HTTP ingress.

Each replica holds the bundle (runtime/fleet/model.py). Routes (all bodies msgpack, see wire.py):

- ``POST /route``: the router at t=0 (not batched: it swaps every candidate's weights).
- ``POST /infer``: one chunk; requests from different robots are batched (``serve.batch``) and
  the batch grouped by routed task, one forward pass per group.
- ``GET /health``: this replica's id, pid and bundle; ``GET /stats``: its counters (JSON).

A malformed or oversized request is answered 4xx with a one-line reason (text/plain) before it
reaches the model; a request that waited in the queue past its ``deadline_ms`` gets 504 without
running. Serve's own health check (``check_health``) fails a replica whose model call has run
for longer than ``STUCK_S``; Serve then replaces it.

Ray is imported inside functions only: this module imports without it (a cell never needs it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from armada.runtime.fleet.model import FleetModel
from armada.runtime.fleet.wire import (CONTENT_TYPE, ChunkReply, ModelRequest, WireError, decode_request,
                                       encode_chunk_reply, encode_route_reply)
from armada.runtime.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger("armada.fleet")

APP_NAME = "armada_fleet"
DEPLOYMENT_NAME = "MergedVLA"
STUCK_S = 30.0  # a model call running this long fails the replica's health check


@dataclass(frozen=True)
class ServiceOptions:
    bundle: str
    replicas: int = 1
    max_batch_size: int = 8
    batch_wait_s: float = 0.002  # how long a batch waits for more requests: added to every request's latency
    # Materialized task weight sets kept per replica: 0 materializes on every switch; -1 keeps as
    # many as fit in resident_budget_mb (armada bench fleet measures what a switch costs either way).
    resident_tasks: int = -1
    resident_budget_mb: float = 2048.0
    replica_cpus: float = 1.0
    threads: int = 1  # torch threads per replica
    verify: bool = True
    host: str = "127.0.0.1"
    port: int = 8000


class FleetService:
    """The deployment's class: one instance per replica."""

    def __init__(self, options: dict[str, Any]):
        from ray import serve

        opts = ServiceOptions(**options)
        self.options = opts
        self.model = FleetModel(opts.bundle, resident_tasks=opts.resident_tasks, verify=opts.verify,
                                threads=opts.threads, resident_budget_mb=opts.resident_budget_mb)
        # Wrapped here rather than decorated in the class body: the module must import without ray.
        self._batched = serve.batch(max_batch_size=opts.max_batch_size,
                                    batch_wait_timeout_s=opts.batch_wait_s)(self._run_batch)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.started = time.time()
        self._calls_since: float | None = None  # monotonic start of the model call now running
        self.refused = 0
        self.expired = 0
        log.info("replica %s (pid %d) holds %s", self.replica, self.pid, opts.bundle)

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, Response

        path = request.url.path.rstrip("/") or "/"
        arrived = time.monotonic()
        try:
            if request.method == "GET" and path.endswith("/health"):
                return JSONResponse(self.health())
            if request.method == "GET" and path.endswith("/stats"):
                return JSONResponse(self.stats())
            op = path.rsplit("/", 1)[-1]
            if request.method != "POST" or op not in ("route", "infer"):
                raise WireError(404, f"{request.method} {path}: the service answers POST /route, POST /infer, "
                                     "GET /health and GET /stats")
            req = decode_request(await _read_body(request))
            if req.op != op:
                raise WireError(400, f"a {req.op} request posted to /{op}")
            if req.op == "infer" and req.task not in self.model.tasks:  # refused before it joins a batch
                raise WireError(422, f"no task named {req.task!r} in this bundle; it has {sorted(self.model.tasks)}")
            if req.op == "route":
                reply = await asyncio.to_thread(self._model_call, self.model.route, req)
                body = encode_route_reply(reply)
            else:
                result = await self._batched((req, arrived))
                if isinstance(result, WireError):
                    raise result
                body = encode_chunk_reply(result)
            return Response(body, media_type=CONTENT_TYPE)
        except WireError as exc:
            self.refused += 1
            return Response(f"{exc.reason}\n", status_code=exc.status, media_type="text/plain")

    async def _run_batch(self, items: list[tuple[ModelRequest, float]]) -> list[ChunkReply | WireError]:
        now = time.monotonic()
        out: list[ChunkReply | WireError | None] = [None] * len(items)
        live: list[int] = []
        for i, (req, arrived) in enumerate(items):
            waited_ms = (now - arrived) * 1e3
            if waited_ms > req.deadline_ms:  # the robot has stopped waiting for it
                self.expired += 1
                out[i] = WireError(504, f"the request waited {waited_ms:.0f} ms in the queue, past its deadline "
                                        f"of {req.deadline_ms:.0f} ms; not run")
            else:
                live.append(i)
        if live:
            replies = await asyncio.to_thread(self._model_call, self.model.infer_batch, [items[i][0] for i in live])
            for i, reply in zip(live, replies):
                if isinstance(reply, ChunkReply):
                    reply.info.update(replica=self.replica, queue_ms=(now - items[i][1]) * 1e3)
                out[i] = reply
        return [r if r is not None else WireError(500, "not answered") for r in out]

    def _model_call(self, fn: Any, arg: Any) -> Any:
        self._calls_since = time.monotonic()
        try:
            return fn(arg)
        finally:
            self._calls_since = None

    # ------------------------------------------------------------------ health

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and replaces it."""
        since = self._calls_since
        if since is not None and time.monotonic() - since > STUCK_S:
            raise RuntimeError(f"a model call has been running for {time.monotonic() - since:.0f} s")

    def health(self) -> dict[str, Any]:
        return {"ok": True, "replica": self.replica, "pid": self.pid, "bundle": self.options.bundle,
                "uptime_s": time.time() - self.started, **self.model.describe()}

    def stats(self) -> dict[str, Any]:
        usage = _process_usage()
        return {"replica": self.replica, "pid": self.pid, "refused": self.refused, "expired": self.expired,
                **usage, **self.model.stats.as_dict()}


async def _read_body(request: Any) -> bytes:
    """The body, refused (413) as soon as it exceeds the protocol's message bound: a huge upload
    is never held in memory whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise WireError(400, f"content-length {declared[:40]!r} is not a number") from None
        if size > MAX_MESSAGE_BYTES:
            raise WireError(413, f"request body of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    parts, total = [], 0
    async for part in request.stream():
        total += len(part)
        if total > MAX_MESSAGE_BYTES:
            raise WireError(413, f"request body exceeds {MAX_MESSAGE_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


def _process_usage() -> dict[str, float]:
    """CPU seconds and resident memory of this process (Linux /proc; zeros elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks
        rss_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        return {"cpu_s": cpu_s, "rss_mb": rss_mb}
    except (OSError, IndexError, ValueError):
        return {"cpu_s": 0.0, "rss_mb": 0.0}


# --------------------------------------------------------------------------- deploying


def build_app(opts: ServiceOptions) -> Any:
    """The Serve application: ``opts.replicas`` replicas of FleetService."""
    from ray import serve

    deployment = serve.deployment(
        FleetService, name=DEPLOYMENT_NAME, num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.replica_cpus},
        max_ongoing_requests=max(16, 2 * opts.max_batch_size),
        health_check_period_s=2.0, health_check_timeout_s=10.0, graceful_shutdown_timeout_s=2.0)
    return deployment.bind(asdict(opts))


@dataclass
class RunningService:
    """A deployed service; ``url`` is where cells reach it."""

    url: str
    opts: ServiceOptions
    started_ray: bool

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()


def start_service(opts: ServiceOptions, address: str | None = None, ready_timeout_s: float = 120.0) -> RunningService:
    """Deploy on a local Ray instance (``address`` None: started here, for development) or on a
    cluster (``auto``, ``ray://host:10001``); returns once every replica answers /health."""
    import ray
    from ray import serve

    if address is None:
        _check_port_free(opts.host, opts.port)
    started_ray = False
    if not ray.is_initialized():
        if address is None:
            cpus = max(os.cpu_count() or 1, int(opts.replicas * opts.replica_cpus + 0.999))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        started_ray = True
    url = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '::') else opts.host}:{opts.port}"
    service = RunningService(url, opts, started_ray)
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts), name=APP_NAME, route_prefix="/", blocking=False)
        wait_replicas(url, opts.replicas, ready_timeout_s)
    except BaseException:
        service.shutdown()  # Ray's processes must not outlive a failed start
        raise
    return service


def _check_port_free(host: str, port: int) -> None:
    """A port in use makes Serve's proxy fail in the background; say so before anything starts."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port") from None


def wait_replicas(url: str, replicas: int, timeout_s: float) -> set[str]:
    """Until ``replicas`` different replicas have answered /health (Serve balances requests over
    them); TimeoutError naming what answered otherwise."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    last = "nothing answered"
    while time.monotonic() < deadline:
        try:
            seen.add(get_json(url, "/health", timeout_s=2.0)["replica"])
            if len(seen) >= replicas:
                return seen
        except (OSError, ValueError, KeyError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise TimeoutError(f"the model service at {url} did not show {replicas} live replica(s) within {timeout_s:.0f} s "
                       f"(saw {len(seen)}; last: {last})")


def get_json(url: str, path: str, timeout_s: float = 2.0) -> dict[str, Any]:
    with urllib.request.urlopen(url + path, timeout=timeout_s) as reply:
        return json.loads(reply.read(1024 * 1024))
