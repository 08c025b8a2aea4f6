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
no driver keeps its stamps as they are (noted in the log once).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping
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
            log.info("camera %s on host %s: no driver there to measure its clock against; its frames' "
                     "ages trust that host's wall clock (keep it NTP-synced: `armada doctor`)", name, host)
    return offsets


def _connected_endpoint(sub: Any) -> str:
    try:
        return sub.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    except (AttributeError, zmq.ZMQError):
        return ""
