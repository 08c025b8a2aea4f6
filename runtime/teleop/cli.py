"""`armada teleop CELL`: drive a follower from its leader arm, the keyboard or a gamepad.

    armada teleop CELL [--driver NAME] [--source leader|keyboard|gamepad] [--arm] [--yes]
                       [--run-dir DIR] [--duration S] [--intervene]

The cell's drivers normally run already (`armada driver`, systemd); when none answers on its cmd
socket, teleop starts the cell's drivers itself and stops them when it exits (they hold first).

Keys (a terminal in cbreak mode; over SSH too):
    e  engage (again): ramped move to the source's pose, confirm, follow
    space  hold (stop following; the follower holds; the lease is kept)
    i  intervene: pause the running episode's policy and take over (with --intervene)
    h  hand back to the policy (with --intervene)
    q  quit (Ctrl-C too): stop following, release; the drivers hold
and, with --source keyboard: 1-9 select a joint, up/down or +/- jog it, [ ] step size.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

from armada.runtime.terminal import Interrupted, StopSignals, TerminalKeys, say

KEYS_HELP = "keys: e engage, space hold, q quit"


def add_teleop_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teleop", help="teleoperate a follower from its leader arm, the keyboard or a gamepad",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cell", type=Path, help="cell YAML")
    p.add_argument("--driver", default=None, help="only this driver of the cell (default: every driver)")
    p.add_argument("--source", choices=["leader", "keyboard", "gamepad"], default="leader",
                   help="where targets come from (leader: the follower driver publishes its leader arm)")
    p.add_argument("--gamepad-device", default=None, help="/dev/input/eventN (default: the first gamepad)")
    p.add_argument("--base", choices=["gamepad"], default=None,
                   help="drive the robot's mobile base from a gamepad (left stick: forward and sideways, right "
                        "stick: turn) while the arms follow --source (leader or keyboard)")
    p.add_argument("--arm", action="store_true",
                   help="let teleop arm disarmed drivers (always on for cells that move no real hardware)")
    p.add_argument("--yes", action="store_true", help="confirm automatically (tests and scripts)")
    p.add_argument("--run-dir", type=Path, default=None, help="the cell's run dir (where its sockets are)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--rate", type=float, default=None, help="servo rate in Hz (default: the driver's control rate)")
    p.add_argument("--intervene", action="store_true",
                   help="attach to a running autonomous cell: 'i' takes over its episode, 'h' hands back")
    p.add_argument("--stats", type=Path, default=None, help="write the servo loop's timing here (JSON)")


def run_teleop(args: argparse.Namespace) -> int:
    with StopSignals() as signals:
        run = _TeleopRun(args)
        code = 1
        try:
            code = run.main()
        except Interrupted as exc:
            signals.defer()
            say(f"armada teleop: {exc}: stopping (followers hold)")
            code = 128 + exc.signum
        finally:
            signals.defer()
            run.close()
        if signals.received is not None and code < 128:
            code = 128 + signals.received
            say(f"armada teleop: stopped by {signal.Signals(signals.received).name}")
        return code


class _TeleopRun:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs = None
        self.sessions: list[Any] = []
        self.intervention = None
        self.keyboard = None
        self.ctx = None

    def main(self) -> int:
        import zmq

        from armada.runtime.config import load_cell
        from armada.runtime.rundir import resolve_run_dir
        from armada.runtime.teleop.session import TeleopError

        args = self.args
        cell = load_cell(args.cell)
        run_dir = resolve_run_dir(args.run_dir, cell.name)
        cell = load_cell(args.cell, run_dir)
        names = [cell.driver(args.driver).name] if args.driver else [d.name for d in cell.drivers]
        if args.source != "leader" and len(names) > 1:
            say(f"armada teleop: --source {args.source} drives one arm: name it with --driver ({', '.join(names)})")
            return 2
        self.ctx = zmq.Context()
        try:
            self.sessions = [self._session(cell, n) for n in names]
        except RuntimeError as exc:  # a source that cannot start (no gamepad, no evdev)
            say(f"armada teleop: {exc}")
            return 1
        if args.base and not any(s.base is not None for s in self.sessions):
            say(f"armada teleop: --base {args.base}: no driver of the cell has a mobile base (a base_velocity group)")
            return 2
        missing = [n for n in names if not _answers(self.ctx, cell, n)]
        if missing:
            if args.intervene:
                say(f"armada teleop --intervene: driver(s) {', '.join(missing)} do not answer: is the cell running?")
                return 1
            if not self._start_drivers(args.cell, run_dir, missing):
                return 1
        if args.intervene:
            from armada.runtime.teleop.intervention import Intervention

            self.intervention = Intervention(cell, self.sessions, self.ctx, say)
        from armada.runtime.teleop.sources import KEYBOARD_HELP, key_tokens

        with TerminalKeys(lambda data: key_tokens(data.decode("utf-8", "replace"))) as keys:
            confirm = self._confirm(keys)
            help_line = KEYS_HELP + (", i intervene, h hand back" if args.intervene else "")
            say(f"armada teleop: {help_line}" + (f"; {KEYBOARD_HELP}" if self.keyboard else ""))
            if not args.intervene:
                try:
                    for s in self.sessions:
                        s.engage(confirm)
                except TeleopError as exc:
                    say(f"armada teleop: cannot engage: {exc}")
                    return 1
            else:
                say("armada teleop: attached; press i to take over the running episode")
            return self._loop(keys, confirm)

    def _start_drivers(self, cell_path: Path, run_dir: Path, names: list[str]) -> bool:
        from armada.runtime.supervisor import CellProcesses

        say(f"armada teleop: no driver answers for {', '.join(names)}: starting them in {run_dir} ...")
        self.procs = CellProcesses(cell_path, run_dir)
        for n in names:
            self.procs.spawn("driver", n)
        try:
            self.procs.wait_ready(30.0)
        except (RuntimeError, TimeoutError) as exc:
            say(f"armada teleop: {exc}")
            return False
        say(f"armada teleop: driver(s) started; logs in {run_dir / 'logs'}")
        return True

    def _session(self, cell: Any, name: str) -> Any:
        from armada.runtime.teleop.session import TeleopSession
        from armada.runtime.teleop.sources import GamepadSource, KeyboardSource, LeaderSource

        if self.args.source == "keyboard":
            source = self.keyboard = KeyboardSource()
        elif self.args.source == "gamepad":
            source = GamepadSource(self.args.gamepad_device, say=say)
        else:
            source = LeaderSource()
        base = self._base(cell, name)
        return TeleopSession(cell, name, source, ctx=self.ctx, say=say, arm=self.args.arm, rate_hz=self.args.rate,
                             base=base)

    def _base(self, cell: Any, name: str) -> Any:
        """The base source for --base, sized to the driver's base group (None without --base)."""
        from armada.runtime.teleop.session import TeleopError
        from armada.runtime.teleop.sources import GamepadBase

        if self.args.base is None:
            return None
        if self.args.source == "gamepad":
            raise TeleopError("--base gamepad drives the base while the arms follow a leader or the keyboard; "
                              "one gamepad cannot also jog the arms (--source gamepad)")
        import numpy as np

        emb = cell.embodiment(cell.driver(name))
        bases = [g for g in emb.groups if g.mode == "base_velocity"]
        if len(bases) == 1 and len(bases[0].joints) == 3:
            return GamepadBase(np.array([j.max for j in bases[0].joints]), self.args.gamepad_device, say=say)
        if self.args.driver is None:
            return None  # every driver of the cell: the base gamepad goes to the one with a base
        raise TeleopError(f"driver {name} has no mobile base of three velocities (vx, vy, wz) for --base")

    def _confirm(self, keys: Any) -> Callable[[str], bool]:
        def confirm(question: str) -> bool:
            if self.args.yes:
                say(f"{question}yes (--yes)")
                return True
            if not keys.interactive:
                say(f"{question}no terminal to answer on: pass --yes")
                return False
            say(question)
            while True:
                for key in keys.read(0.2):
                    return key in ("y", "Y")

        return confirm

    def _loop(self, keys: Any, confirm: Callable[[str], bool]) -> int:
        from armada.runtime.teleop.session import TeleopError

        deadline = None if self.args.duration is None else time.monotonic() + self.args.duration
        shown = [s.status for s in self.sessions]
        while deadline is None or time.monotonic() < deadline:
            if self.procs is not None and self.procs.dead():
                say("armada teleop: " + "; ".join(why for _, why in self.procs.dead()))
                return 1
            for key in keys.read(0.1):
                if key in ("q", "Q"):
                    return 0
                try:
                    self._on_key(key, confirm)
                except TeleopError as exc:
                    say(f"armada teleop: {exc}")
            for i, s in enumerate(self.sessions):
                if s.status != shown[i]:
                    shown[i] = s.status
                    if s.status.startswith("holding"):
                        say(f"teleop {s.drv.name}: {s.status}; press e to engage again")
        return 0

    def _on_key(self, key: str, confirm: Callable[[str], bool]) -> None:
        if key == "e":
            for s in self.sessions:
                s.engage(confirm)
        elif key == " ":
            for s in self.sessions:
                s.hold()
        elif key == "i" and self.intervention is not None:
            self.intervention.take_over(confirm)
        elif key == "h" and self.intervention is not None:
            self.intervention.hand_back()
        elif self.keyboard is not None:
            said = self.keyboard.on_key(key)
            if said:
                say(said)

    def close(self) -> None:
        for s in self.sessions:
            summary = s.stats.summary()
            s.close()
            if summary.get("sent"):
                say(f"teleop {s.drv.name}: {summary['sent']} targets, "
                     f"interval median {summary.get('interval_median_ms', 0):.2f} ms, "
                     f"p99 {summary.get('interval_p99_ms', 0):.2f} ms, refused {summary['refused']}")
            if self.args.stats is not None:
                stats = json.loads(self.args.stats.read_text()) if self.args.stats.exists() else {}
                stats[s.drv.name] = summary
                self.args.stats.write_text(json.dumps(stats, indent=2))
        if self.intervention is not None:
            if self.intervention.active:
                say("armada teleop: the episode stays paused (not handed back): `h` in a new teleop, or stop it")
            self.intervention.close()
        if self.procs is not None:
            say("armada teleop: stopping the drivers it started (they hold first)")
            self.procs.close()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)


def _answers(ctx: Any, cell: Any, name: str) -> bool:
    from armada.runtime.supervisor import answers_hello

    return answers_hello(ctx, cell.driver(name).cmd, cell.curve, "teleop-probe")

