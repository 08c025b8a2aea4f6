"""The python-can buses the PiPer fakes run on, and two quirks of ``udp_multicast`` on Linux.

``virtual`` only connects buses inside one process. ``udp_multicast`` (the channel is an IPv4
multicast group, 239.x.y.z) connects processes on one host, which is what a fake in its own
process needs. It differs from a real CAN bus in two ways that matter here:

1. Every socket joined to *any* group on the same UDP port receives the traffic of *every* group
   joined anywhere on the host (Linux's IP_MULTICAST_ALL defaults to 1). Two fakes on two groups
   but one port would hear each other's frames: a Cobot Magic's left arm would follow the right
   arm's commands. ``isolate`` turns that off for one bus (PiperBackend applies it to the SDK's
   buses). A different UDP port per bus also separates them (python-can takes ``port``
   from the ``CAN_CONFIG`` environment variable, e.g. ``CAN_CONFIG='{"port": 45000}'``).
2. piper_sdk 0.6 opens two buses per arm, one to receive and one to send. On SocketCAN it opens
   them with ``local_loopback=False``, so its receive bus never sees what its send bus sent; on
   ``udp_multicast`` and ``virtual`` that option does not exist, and the SDK hears its own
   0x155-0x159 commands as if a master arm had sent them. ``drivers.cobot_magic.backend`` tells the
   two apart.
"""

from __future__ import annotations


import can

from armada.drivers.piper.multicast import _socket_of, check_multicast_group, isolate  # noqa: F401 (re-exported)

FAKE_RCVBUF_BYTES = 4 * 1024 * 1024  # ~10k frames: a fake stalled by a busy CPU must not drop commands


def open_bus(channel: str, bustype: str, port: int | None = None) -> can.BusABC:
    """A bus for a fake: on ``udp_multicast`` isolated to its own group, with a large receive buffer."""
    if bustype == "udp_multicast":
        try:
            check_multicast_group(channel)
        except ValueError as exc:
            raise RuntimeError(str(exc)) from None
    kwargs: dict = {"receive_own_messages": False}
    if bustype == "udp_multicast" and port is not None:
        kwargs["port"] = port
    try:
        bus = can.Bus(interface=bustype, channel=channel, **kwargs)
    except (can.CanError, OSError, ValueError) as exc:
        raise RuntimeError(f"cannot open a {bustype} CAN bus on {channel!r}: {exc}") from exc
    if bustype == "udp_multicast":
        isolate(bus, rcvbuf=FAKE_RCVBUF_BYTES)
    return bus


def bus_port(bus: can.BusABC) -> int | None:
    """The UDP port a ``udp_multicast`` bus is bound to; None for other bus types."""
    sock = _socket_of(bus)
    return None if sock is None else sock.getsockname()[1]
