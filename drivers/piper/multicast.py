"""PiPer buses on python-can's ``udp_multicast`` (how a driver reaches a fake in another process):
the checks and socket options the backend applies to the SDK's buses. Production code; the fakes
(drivers/piper/fake/bus.py) use it too, never the other way round. fake/bus.py explains the quirks.
"""

from __future__ import annotations

import ipaddress
import select
import socket
from typing import Any

IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux; Python does not export it


def check_multicast_group(channel: str) -> None:
    """Raise ValueError unless ``channel`` is a multicast address, as ``udp_multicast`` needs."""
    try:
        ok = ipaddress.ip_address(channel).is_multicast
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"udp_multicast channel {channel!r} is not a multicast group: use an address in "
                         "224.0.0.0/4, such as 239.74.163.2")


def _socket_of(bus: Any) -> socket.socket | None:
    multicast = getattr(bus, "_multicast", None)
    return getattr(multicast, "_socket", None)


def isolate(bus: Any, rcvbuf: int | None = None) -> None:
    """Make a ``udp_multicast`` bus receive only its own group, and drop what leaked in already.

    Frames of other groups that arrived between the socket's creation and this call are read and
    discarded (along with any of its own group, which a streaming peer simply sends again).
    Other bus types are left alone.
    """
    sock = _socket_of(bus)
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    while select.select([sock], [], [], 0)[0]:
        sock.recv(65536)
