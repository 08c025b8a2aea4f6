"""Operator commands for a running cell: `armada status`, `armada estop`, `armada reset-estop`.

An e-stop latches in the driver and survives a driver restart (the latch is a file in the run
dir, or in $ARMADA_STATE_DIR under systemd, where it survives a reboot too), so an operator needs
a way to see it and to reset it that does not go through an episode.
Every call has a timeout; a driver that does not answer is reported, never waited on forever.
Resetting needs the control lease, taken and released on one connection (the driver binds a
lease to the connection that acquired it); it leaves the driver disarmed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq

from armada.runtime.config import CellConfig, DriverConfig, load_cell
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.rundir import resolve_run_dir
from armada.runtime.transport import CommandClient, RemoteError

TIMEOUT_S = 1.0


@dataclass
class DriverAnswer:
    name: str
    ok: bool
    mode: str = ""
    detail: str = ""

    def line(self) -> str:
        status = self.mode if self.ok else "NO ANSWER" if not self.mode else self.mode
        return f"  {self.name:<16} {status:<12} {self.detail}".rstrip()


def load_running_cell(cell_path: Path, run_dir: Path | None) -> CellConfig:
    """The cell with its endpoints in the run dir its processes use (checked private)."""
    name = load_cell(cell_path).name
    return load_cell(cell_path, resolve_run_dir(run_dir, name))


def _drivers(cell: CellConfig, name: str | None) -> list[DriverConfig]:
    if name is None:
        return list(cell.drivers)
    return [cell.driver(name)]


def status(cell: CellConfig, name: str | None = None) -> list[DriverAnswer]:
    answers = []
    with _context() as ctx:
        for drv in _drivers(cell, name):
            client = CommandClient(ctx, drv.cmd, cell.curve, default_timeout_s=TIMEOUT_S)
            try:
                client.request("hello", version=PROTOCOL_VERSION, role="operator")
                stats = client.request("stats")
                answers.append(DriverAnswer(drv.name, True, stats["mode"], _describe(stats)))
            except (TimeoutError, RemoteError) as exc:
                answers.append(DriverAnswer(drv.name, False, detail=str(exc)))
            finally:
                client.close()
    return answers


def estop(cell: CellConfig, name: str | None = None, reason: str = "operator") -> list[DriverAnswer]:
    """Press the e-stop of every driver (or one): no lease needed, each with its own timeout."""
    answers = []
    with _context() as ctx:
        for drv in _drivers(cell, name):
            client = CommandClient(ctx, drv.cmd, cell.curve, default_timeout_s=TIMEOUT_S)
            try:
                reply = client.request("estop", reason=reason)
                answers.append(DriverAnswer(drv.name, reply.get("mode") == "estop", reply.get("mode", "?")))
            except (TimeoutError, RemoteError) as exc:
                answers.append(DriverAnswer(drv.name, False, detail=str(exc)))
            finally:
                client.close()
    return answers


def reset_estop(cell: CellConfig, name: str) -> DriverAnswer:
    """Reset one driver's latched e-stop; it stays disarmed. Needs the lease, released afterwards."""
    drv = cell.driver(name)
    with _context() as ctx:
        client = CommandClient(ctx, drv.cmd, cell.curve, default_timeout_s=TIMEOUT_S)
        try:
            lease = client.request("acquire", client="operator reset-estop")["lease"]
            try:
                reply = client.request("reset_estop", lease=lease)
            finally:
                try:
                    client.request("release", lease=lease)
                except (TimeoutError, RemoteError):
                    pass  # the lease lapses on its own within the cell's TTL
            return DriverAnswer(drv.name, True, reply.get("mode", "?"), "reset; arm it again to move")
        except (TimeoutError, RemoteError) as exc:
            return DriverAnswer(drv.name, False, detail=str(exc))
        finally:
            client.close()


def _describe(stats: dict) -> str:
    counters = stats.get("counters", {})
    parts = [f"ticks={counters.get('ticks', '?')}", f"overruns={counters.get('overruns', '?')}"]
    if stats.get("lease_holder"):
        parts.append(f"lease held by {stats['lease_holder']!r}")
    if stats.get("reason"):
        parts.append(f"reason: {stats['reason']}")
    return "  ".join(parts)


class _context:
    def __enter__(self) -> zmq.Context:
        self.ctx = zmq.Context()
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        self.ctx.destroy(linger=0)
