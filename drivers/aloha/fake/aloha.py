"""A whole fake ALOHA: four Dynamixel buses on ptys (two ViperX 300 S followers, two WidowX 250 S
leaders), each a ``DynamixelBusFake`` with the real arm's IDs, models and linked shadow motors.

In-process (tests): ``fake = AlohaFake(); ports = fake.start()`` -> {"puppet_left": "/dev/pts/7", ...}.

As its own process (a cell, `armada fake aloha`):

    python -m armada.drivers.aloha.fake.aloha --link-dir DIR [--control SOCK] [--no-leaders]

creates ``DIR/ttyDXL_puppet_left`` etc. (ALOHA's udev names) as symlinks to the ptys, so a cell names
fixed paths (``{run_dir}/ttyDXL_puppet_left``), prints ``ready`` with the paths as one JSON line, and
serves until SIGTERM/SIGINT. ``--control SOCK`` listens on a Unix socket for fault injection: one
JSON object per line in, one JSON reply per line out, e.g.

    {"op": "set_error", "bus": "puppet_left", "id": 4, "overload": true}
    {"op": "set_missing", "bus": "puppet_right", "id": 9}
    {"op": "set_bad_crc", "bus": "puppet_left", "id": 1}
    {"op": "unplug", "bus": "puppet_left"}          (its pty closes; the symlink stays, dangling)
    {"op": "replug", "bus": "master_left"}          (a new pty, the symlink points at it again; the
                                                     servos keep their state, as on USB re-enumeration)
    {"op": "goals", "bus": "puppet_left"}           -> {"goals": [[id, ticks], ...]} (every goal received)
    {"op": "torque", "bus": "puppet_left"}          -> {"torque": {id: 0|1}}
    {"op": "move_by_hand", "bus": "master_left", "id": 1, "position": 2300}
    {"op": "position", "bus": "puppet_left", "id": 1} -> {"position": ticks}
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from armada.drivers.core.fake.bus_process import FakeProcess, serve
from armada.drivers.core.fake.bus_set import BusSet

from armada.drivers.aloha.fake.dynamixel import TORQUE_ENABLE, DynamixelBusFake

BUSES = ("puppet_left", "puppet_right", "master_left", "master_right")
# id -> model, as on the arms (vx300s / wx250s; shadows 3 and 5 are linked to 2 and 4).
FOLLOWER = {1: "xm540-w270", 2: "xm540-w270", 3: "xm540-w270", 4: "xm540-w270", 5: "xm540-w270",
            6: "xm540-w270", 7: "xm540-w270", 8: "xm430-w350", 9: "xm430-w350"}
LEADER = {1: "xm430-w350", 2: "xm430-w350", 3: "xm430-w350", 4: "xm430-w350", 5: "xm430-w350",
          6: "xm430-w350", 7: "xm430-w350", 8: "xl430-w250", 9: "xc430-w150"}
SHADOW_LINKS = {3: 2, 5: 4}
# Start where a powered-up ALOHA rests: folded (shoulder -0.96, elbow 1.16, wrist angle -0.3 rad, the
# embodiment's home; shadows 3 and 5 with their primaries), the other joints at 2048 (0 rad), grippers
# half open between ALOHA's open/close readings. Not all zeros: that is both arms stretched out
# horizontally, which on the ALOHA's table meets the other arm in the middle.
REST_RAD = {2: -0.96, 3: -0.96, 4: 1.16, 5: 1.16, 7: -0.3}
REST_TICKS = {sid: 2048 + round(rad * 4096 / (2 * math.pi)) for sid, rad in REST_RAD.items()}
FOLLOWER_GRIPPER_START = 2331
LEADER_GRIPPER_START = 1925


class AlohaFake(BusSet[DynamixelBusFake]):
    def __init__(self, leaders: bool = True, max_speed: float = 3000.0, tick_s: float = 0.005):
        buses: dict[str, DynamixelBusFake] = {}
        for name in BUSES if leaders else BUSES[:2]:
            follower = name.startswith("puppet")
            servos = FOLLOWER if follower else LEADER
            positions = {i: REST_TICKS.get(i, 2048) for i in servos}
            positions[9] = FOLLOWER_GRIPPER_START if follower else LEADER_GRIPPER_START
            bus = DynamixelBusFake(dict(servos), positions=positions, max_speed=max_speed, tick_s=tick_s)
            for shadow, primary in SHADOW_LINKS.items():
                bus.link_shadow(shadow, primary)
            buses[name] = bus
        super().__init__(buses)

    # --- the control socket's own commands (the common ones are BusSet's) ------------------------
    torque_register = TORQUE_ENABLE

    def device_command(self, op: Any, bus: Any, sid: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
        if op == "set_error":
            flags = {k: bool(msg.get(k, False)) for k in ("overload", "overheat", "voltage", "electrical_shock",
                                                          "encoder")}
            bus.set_error(int(sid), **flags)
        elif op == "set_bad_crc":
            bus.set_bad_crc(int(sid), bool(msg.get("bad", True)))
        else:
            return None
        return {}


class AlohaFakeProcess(FakeProcess):
    """`python -m armada.drivers.aloha.fake.aloha` as a child process, with a client for its control socket
    (tests and `armada bench aloha`)."""

    def __init__(self, link_dir: Path, *extra: str, ready_timeout_s: float = 10.0):
        super().__init__("armada.drivers.aloha.fake.aloha", "ALOHA", link_dir, "aloha-fake.sock", *extra,
                         ready_timeout_s=ready_timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="armada fake aloha",
                                     description="A fake ALOHA: four Dynamixel Protocol 2.0 buses on ptys")
    parser.add_argument("--link-dir", type=Path, required=True,
                        help="where to create ttyDXL_puppet_left, ... (symlinks to the ptys)")
    parser.add_argument("--control", type=Path, default=None, help="Unix socket for fault injection (JSON lines)")
    parser.add_argument("--no-leaders", action="store_true", help="only the two follower buses")
    parser.add_argument("--max-speed", type=float, default=3000.0, help="servo speed, ticks/s at Profile Velocity 0")
    args = parser.parse_args(argv)
    fake = AlohaFake(leaders=not args.no_leaders, max_speed=args.max_speed)
    fake.link_dir, fake.link_prefix = args.link_dir, "ttyDXL_"
    return serve(fake, fake.start(), args.link_dir, "ttyDXL_", args.control, "aloha")


if __name__ == "__main__":
    raise SystemExit(main())
