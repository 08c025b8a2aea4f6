"""Endpoint checks, shared by the config loader and the sockets (no ZeroMQ import here).

Which endpoints a cell may name: ipc:// paths (owner-only files in the run dir), inproc://, and
tcp:// only with CURVE, or on loopback when the cell opts in knowingly.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit


def check_endpoint(endpoint: str, curve: bool = False, plain_tcp_loopback: bool = False) -> None:
    """Raise ValueError unless the endpoint is an ipc:// path, inproc://, or tcp:// with CURVE.

    Plain tcp:// on loopback passes only with ``plain_tcp_loopback`` (the cell's explicit opt-in):
    every local user can connect to it. An abstract ipc socket (``ipc://@name``) never passes: it
    has no file, so no permissions at all.
    """
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        if not rest:
            raise ValueError(f"endpoint {endpoint!r} has no path")
        if scheme == "ipc" and rest.startswith("@"):
            raise ValueError(f"endpoint {endpoint!r} is an abstract ipc socket: it has no file permissions, so "
                             "every local user can connect; use a path in the run dir (ipc://{run_dir}/name)")
        return
    if scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: scheme must be ipc://, inproc:// or tcp://")
    parts = urlsplit(endpoint)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"endpoint {endpoint!r}: tcp endpoints need host:port")
    if curve:
        return
    if not is_loopback(parts.hostname):
        raise ValueError(f"endpoint {endpoint!r}: plain TCP is allowed only on loopback; "
                         "configure `curve` keys in the cell for TCP between hosts")
    if not plain_tcp_loopback:
        raise ValueError(f"endpoint {endpoint!r}: plain TCP on loopback is open to every local user; use "
                         "ipc://{run_dir}/name on one host, configure `curve` keys, or set "
                         "`plain_tcp_loopback: true` in the cell knowingly (single-user machines, tests, benchmarks)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None
