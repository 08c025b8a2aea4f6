"""A whole fake SO-101: the follower's and the leader's Feetech buses on ptys, each a
``FeetechBusFake`` of six STS3215 at IDs 1-6 (shoulder_pan .. gripper).

In-process (tests): ``fake = So101Fake(); ports = fake.start()`` -> {"follower": "/dev/pts/7", ...}.

As its own process (a cell, `armada fake so101`):

    python -m armada.drivers.so101.fake.so101 --link-dir DIR [--control SOCK] [--no-leader]

creates ``DIR/ttySO101_follower`` and ``DIR/ttySO101_leader`` as symlinks to the ptys, prints
``ready`` with the paths as one JSON line, and serves until SIGTERM/SIGINT. ``--control SOCK``
listens on a Unix socket for fault injection: one JSON object per line in, one reply per line out:

    {"op": "set_error", "bus": "follower", "id": 3, "overload": true}   (also overheat, voltage, overcurrent, angle)
    {"op": "set_missing", "bus": "follower", "id": 6}
    {"op": "set_bad_checksum", "bus": "follower", "id": 1}
    {"op": "unplug", "bus": "follower"}          (its pty closes; the symlink stays, dangling)
    {"op": "replug", "bus": "leader"}            (a new pty, the symlink points at it again; the servos
                                                  keep their state, as on USB re-enumeration)
    {"op": "goals", "bus": "follower"}           -> {"goals": [[id, ticks], ...]} (every goal received)
    {"op": "torque", "bus": "follower"}          -> {"torque": {id: 0|1}}
    {"op": "move_by_hand", "bus": "leader", "id": 1, "position": 2300}
    {"op": "position", "bus": "follower", "id": 1} -> {"position": ticks}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from armada.drivers.core.fake.bus_process import FakeProcess, serve
from armada.drivers.core.fake.bus_set import BusSet

from armada.drivers.so101.fake.feetech import TORQUE_ENABLE, FeetechBusFake

BUSES = ("follower", "leader")
IDS = (1, 2, 3, 4, 5, 6)
ERROR_FLAGS = ("overload", "overheat", "voltage", "overcurrent", "angle")


class So101Fake(BusSet[FeetechBusFake]):
    def __init__(self, leader: bool = True, max_speed: float = 3000.0, tick_s: float = 0.005):
        super().__init__({name: FeetechBusFake(IDS, max_speed=max_speed, tick_s=tick_s)
                          for name in (BUSES if leader else BUSES[:1])})

    torque_register = TORQUE_ENABLE

    def device_command(self, op: Any, bus: Any, sid: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
        if op == "set_error":
            bus.set_error(int(sid), **{k: bool(msg.get(k, False)) for k in ERROR_FLAGS})
        elif op == "set_bad_checksum":
            bus.set_bad_checksum(int(sid), bool(msg.get("bad", True)))
        else:
            return None
        return {}


class So101FakeProcess(FakeProcess):
    """`python -m armada.drivers.so101.fake.so101` as a child process, with a client for its control socket."""

    def __init__(self, link_dir: Path, *extra: str, ready_timeout_s: float = 10.0):
        super().__init__("armada.drivers.so101.fake.so101", "SO-101", link_dir, "so101-fake.sock", *extra,
                         ready_timeout_s=ready_timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armada fake so101",
                                     description="A fake SO-101: follower and leader Feetech STS3215 buses on ptys")
    parser.add_argument("--link-dir", type=Path, required=True,
                        help="where to create ttySO101_follower and ttySO101_leader (symlinks to the ptys)")
    parser.add_argument("--control", type=Path, default=None, help="Unix socket for fault injection (JSON lines)")
    parser.add_argument("--no-leader", action="store_true", help="only the follower bus")
    parser.add_argument("--max-speed", type=float, default=3000.0, help="servo speed, steps/s at Goal_Velocity 0")
    args = parser.parse_args(argv)
    fake = So101Fake(leader=not args.no_leader, max_speed=args.max_speed)
    fake.link_dir, fake.link_prefix = args.link_dir, "ttySO101_"
    return serve(fake, fake.start(), args.link_dir, "ttySO101_", args.control, "so101")


if __name__ == "__main__":
    raise SystemExit(main())
