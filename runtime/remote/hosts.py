"""Which of a cell's processes run on this host, for `armada run` on a cell split over hosts.

A process runs where its endpoints bind: a driver's ``state`` and ``cmd``, a camera's ``frames``
(and ``clock``), the inference's ``ctl`` and ``events``. An endpoint is this host's when it is
ipc/inproc, or a tcp address this host owns. "Owns" is decided one of two ways:

- by default, an address this machine can bind (``bind((address, 0))`` succeeds: one of its
  interface addresses, any 127.x loopback address, ``*``/``0.0.0.0``, or a name resolving to one);
- with ``--this-host ADDR`` (repeatable), exactly those addresses (as written in the endpoints, or
  resolving to the same IP) and nothing else but ipc. Needed where one machine plays several hosts
  (the tests' 127.0.0.2 robot and 127.0.0.3 GPU host, which this machine could both bind), and a
  way to say it explicitly on a real host.

A process whose endpoints name two different hosts is a broken cell (it cannot bind both): refused
with the keys to fix.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Iterable, Sequence

from armada.runtime.config import CellConfig
from armada.runtime.remote.clock import endpoint_host

WILDCARDS = {"*", "0.0.0.0", "::", ""}


class HostSplitError(ValueError):
    pass


def can_bind(address: str) -> bool:
    """Whether this machine owns ``address``: binding it (port 0, closed at once) succeeds."""
    if address in WILDCARDS:
        return True
    try:
        infos = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def _ips(address: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return set()


@dataclass(frozen=True)
class ThisHost:
    """What counts as this host: None is every address this machine can bind."""

    addresses: tuple[str, ...] | None = None

    @classmethod
    def of(cls, addresses: Sequence[str] | None) -> "ThisHost":
        if not addresses:
            return cls(None)
        for a in addresses:
            if not a or a in WILDCARDS:
                raise HostSplitError(f"--this-host {a!r}: name an address of this host as the cell's endpoints "
                                     "write it (10.0.0.2), not a wildcard")
        return cls(tuple(addresses))

    def owns(self, endpoint: str) -> bool:
        host = endpoint_host(endpoint)
        if host is None:
            return True  # ipc/inproc: a file or name on this host
        if self.addresses is None:
            return can_bind(host)
        if host in self.addresses:
            return True
        ips = _ips(host)
        return any(ips & _ips(a) for a in self.addresses)


@dataclass(frozen=True)
class Placement:
    """One process of the cell and where it runs."""

    role: str  # "driver", "camera", "infer"
    name: str | None
    endpoints: tuple[str, ...]
    local: bool

    @property
    def title(self) -> str:
        return "inference" if self.role == "infer" else f"{self.role} {self.name}"

    @property
    def host(self) -> str:
        """The host it binds on, as the endpoints name it ('this host' for ipc)."""
        return next((h for h in (endpoint_host(e) for e in self.endpoints) if h), "this host")

    def start_command(self, cell_path: str) -> str:
        """What to run on its host to start it by hand."""
        return f"armada {self.role} {cell_path}" + (f" --name {self.name}" if self.name else "")


def bound_endpoints(cell: CellConfig, role: str, name: str | None) -> list[tuple[str, str]]:
    """(key, endpoint) of every endpoint one process binds."""
    if role == "driver":
        d = cell.driver(name)
        return [("state", d.state), ("cmd", d.cmd)]
    if role == "camera":
        c = cell.camera(name)
        clock = c.clock
        return [("frames", c.frames)] + ([("clock", clock)] if clock else [])
    return [("ctl", cell.inference.ctl), ("events", cell.inference.events)]


def placements(cell: CellConfig, here: ThisHost) -> list[Placement]:
    """Every process of the cell, in start order (drivers, cameras, inference), with its host."""
    out = []
    procs: Iterable[tuple[str, str | None]] = ([("driver", d.name) for d in cell.drivers]
                                               + [("camera", c.name) for c in cell.cameras] + [("infer", None)])
    for role, name in procs:
        eps = bound_endpoints(cell, role, name)
        owned = {key: here.owns(ep) for key, ep in eps}
        if len(set(owned.values())) > 1:
            title = "inference" if role == "infer" else f"{role} {name}"
            mine = [f"{k}={ep}" for k, ep in eps if owned[k]]
            theirs = [f"{k}={ep}" for k, ep in eps if not owned[k]]
            raise HostSplitError(f"{title} binds on two hosts: {', '.join(mine)} on this one, {', '.join(theirs)} "
                                 "elsewhere; one process binds all its endpoints on one host: give them one address")
        out.append(Placement(role, name, tuple(ep for _, ep in eps), all(owned.values())))
    return out
