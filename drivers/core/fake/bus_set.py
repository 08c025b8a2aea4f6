"""A device's servo buses as one fake: each on its own pty, started and stopped together, and
unplugged and plugged in again one at a time (a USB adapter pulled and put back)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generic, TypeVar

Bus = TypeVar("Bus")  # a pty bus fake: start() -> port, stop(), alive


class BusSet(Generic[Bus]):
    """The buses, and the control socket's commands every servo-bus fake takes (JSON objects with
    ``op``, ``bus``, ``id``): set_missing, unplug, replug, goals, torque, move_by_hand, position.
    A device adds its own (its error flags, its checksum fault) in ``device_command``."""

    torque_register: int  # the Torque_Enable address in the device's control table

    def __init__(self, buses: dict[str, Bus]):
        self.buses = buses
        self.ports: dict[str, str] = {}
        self.link_dir: Path | None = None  # where `serve` made the udev-like symlinks, for replug
        self.link_prefix = ""

    def start(self) -> dict[str, str]:
        self.ports = {name: bus.start() for name, bus in self.buses.items()}  # type: ignore[attr-defined]
        return dict(self.ports)

    def stop(self) -> None:
        for bus in self.buses.values():
            bus.stop()  # type: ignore[attr-defined]

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bus(self, name: str) -> Bus:
        try:
            return self.buses[name]
        except KeyError:
            raise KeyError(f"no bus {name!r}; buses are {list(self.buses)}") from None

    def replug(self, name: str) -> str:
        """The adapter is plugged in again after ``unplug``: the bus serves on a new pty (the servos keep
        their state) and the symlink, if any, points at it, as a udev rule re-creates its name."""
        bus = self.bus(name)
        if bus.alive:  # type: ignore[attr-defined]
            raise ValueError(f"bus {name!r} is plugged in")
        port = bus.start()  # type: ignore[attr-defined]
        self.ports[name] = port
        if self.link_dir is not None:
            link = self.link_dir / f"{self.link_prefix}{name}"
            tmp = link.with_name(link.name + ".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(port)
            tmp.replace(link)  # atomic: the name never points nowhere
        return port

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        bus: Any = self.bus(str(msg.get("bus")))
        sid = msg.get("id")
        reply = self.device_command(op, bus, sid, msg)
        if reply is not None:
            return reply
        if op == "set_missing":
            bus.set_missing(int(sid), bool(msg.get("missing", True)))
        elif op == "unplug":
            bus.unplug()
        elif op == "replug":
            return {"port": self.replug(str(msg.get("bus")))}
        elif op == "goals":
            return {"goals": [list(g) for g in bus.received_goals]}
        elif op == "torque":
            return {"torque": {str(i): bus.register(i, self.torque_register) for i in bus.ids()}}
        elif op == "move_by_hand":
            bus.move_by_hand(int(sid), msg.get("position"), float(msg.get("speed", 2000.0)))
        elif op == "position":
            return {"position": bus.present_position(int(sid))}
        else:
            raise ValueError(f"unknown op {op!r}")
        return {}

    def device_command(self, op: Any, bus: Any, sid: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The device's own commands: a reply, or None when ``op`` is not one of them."""
        return None
