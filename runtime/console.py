"""The operator console of `armada run`: single keys on a plain terminal (no X11) while episodes run.

    p   pause / resume: the policy stops sending chunks and releases every lease, the drivers
        decelerate to a hold (the inference process's ``intervene``); p again takes the leases back
        and the episode goes on (``resume``). The same path as a teleop intervention.
    s   stop the episode and end the run (no more episodes)
    e   e-stop every driver: latched in each driver, the same path as `armada estop`; the episode
        fails, and the run waits for the operator before another episode
    r   reset the e-stop of every driver that has one latched (each stays disarmed)
    n   next episode: stop this one and go on; after an e-stop, start the next one

Keys are read only when stdin is a terminal; a piped or CI run never sees this class do anything
(``interactive`` is False and nothing is read). Nothing here arms a driver: an arm moves only in
an episode the operator asked for (``--arm`` or a cell that moves no hardware), as before.

The status line (drivers' modes, control rate and clamps) comes from each driver's ``stats``,
asked in a thread of its own twice a second with a short timeout, so a driver that does not answer
never stalls the keys or the episode.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from armada.runtime import operator_commands as operator
from armada.runtime.config import CellConfig
from armada.runtime.terminal import TerminalKeys
from armada.runtime.transport import CommandClient, RemoteError

KEYS = {"p": "pause", "s": "stop", "e": "estop", "r": "reset", "n": "next"}
HELP = "keys: p pause/resume  s stop  e e-stop  r reset e-stop  n next episode"
STATS_PERIOD_S = 0.5
STATS_TIMEOUT_S = 0.5


def parse_keys(data: bytes) -> list[str]:
    """The console's actions in what the terminal sent; anything else (arrows, other letters) is ignored."""
    text = data.decode("utf-8", "replace").lower()
    if "\x1b" in text:  # an escape sequence (an arrow key): its letters are not commands
        text = text.split("\x1b")[0]
    return [KEYS[c] for c in text if c in KEYS]


@dataclass
class DriverView:
    """One driver as the status line shows it."""

    name: str
    mode: str = "?"
    rate_hz: float | None = None
    clamps: int = 0
    answered: bool = False
    asked: bool = False

    def text(self) -> str:
        if not self.asked:
            return f"{self.name} ..."
        if not self.answered:
            return f"{self.name} no answer"
        rate = f" {self.rate_hz:.0f} Hz" if self.rate_hz is not None else ""
        return f"{self.name} {self.mode}{rate} clamps {self.clamps}"


class DriverWatch:
    """Each driver's mode, tick rate and clamp count, asked twice a second in a thread of its own
    (its own sockets: a zmq socket stays in the thread that made it)."""

    def __init__(self, ctx: zmq.Context, cell: CellConfig, period_s: float = STATS_PERIOD_S):
        self.ctx, self.cell, self.period_s = ctx, cell, period_s
        self.views = {d.name: DriverView(d.name) for d in cell.drivers}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-stats", daemon=True)

    def start(self) -> "DriverWatch":
        self._thread.start()
        return self

    def snapshot(self) -> list[DriverView]:
        with self._lock:
            return [DriverView(**v.__dict__) for v in self.views.values()]

    def _run(self) -> None:
        clients = {d.name: CommandClient(self.ctx, d.cmd, self.cell.curve, default_timeout_s=STATS_TIMEOUT_S)
                   for d in self.cell.drivers}
        last: dict[str, tuple[float, int]] = {}
        try:
            while not self._stop.is_set():
                for name, client in clients.items():
                    view = self._ask(name, client, last)
                    with self._lock:
                        self.views[name] = view
                self._stop.wait(self.period_s)
        finally:
            for client in clients.values():
                client.close()

    @staticmethod
    def _ask(name: str, client: CommandClient, last: dict[str, tuple[float, int]]) -> DriverView:
        try:
            stats = client.request("stats")
        except (TimeoutError, RemoteError):
            last.pop(name, None)
            return DriverView(name, asked=True)
        now, ticks = time.monotonic(), int(stats.get("counters", {}).get("ticks", 0))
        rate = None
        if name in last and now > last[name][0]:
            rate = (ticks - last[name][1]) / (now - last[name][0])
        last[name] = (now, ticks)
        clamps = sum(v for v in (stats.get("clamps") or {}).values() if isinstance(v, int))
        return DriverView(name, str(stats.get("mode", "?")), rate, clamps, answered=True, asked=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * STATS_TIMEOUT_S * max(1, len(self.views)) + self.period_s)


class OperatorConsole:
    """Reads the operator's keys between looks at the episode and acts on them. ``client`` is the
    run's EpisodeClient (ctl of the inference process); ``say`` prints a line for the operator."""

    def __init__(self, cell: CellConfig, ctx: zmq.Context, client: Any, keys: TerminalKeys,
                 say: Callable[[str], None] = print, watch: bool = True):
        self.cell, self.client, self.keys, self.say = cell, client, keys, say
        self.paused = False
        self.estopped = False  # an e-stop was pressed here and not reset since
        self.end_run = False  # s: no more episodes
        self.operator_stop: str | None = None  # why this episode was ended from the console
        self.task: str | None = None
        self.watch = DriverWatch(ctx, cell).start() if (watch and self.interactive) else None

    @property
    def interactive(self) -> bool:
        return self.keys.interactive

    def new_episode(self) -> None:
        self.paused, self.operator_stop, self.task = False, None, None

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "route":
            self.task = data.get("task")

    def status(self) -> str:
        """The console's part of the status line: routed task, drivers, pause/e-stop flags."""
        parts = [f"task {self.task or '-'}"]
        if self.watch is not None:
            parts += [v.text() for v in self.watch.snapshot()]
        if self.paused:
            parts.append("PAUSED (p resumes)")
        if self.estopped:
            parts.append("E-STOP latched (r resets)")
        return " | ".join(parts)

    # ------------------------------------------------------------------ keys

    def poll(self, running: bool) -> list[str]:
        """Act on the keys pressed since the last look (never waits); returns the actions taken."""
        if not self.interactive:
            return []
        actions = self.keys.read(0.0)
        for action in actions:
            getattr(self, f"_{action}")(running)
        return actions

    def _pause(self, running: bool) -> None:
        if not running:
            self.say("console: no episode is running: nothing to pause")
            return
        try:
            if not self.paused:
                episode = self.client.intervene()
                self.paused = True
                self.say(f"console: episode {episode} paused: no more chunks, the drivers hold (p resumes)")
            else:
                held = self.client.resume()
                self.paused = False
                self.say(f"console: resumed after {held:.1f} s")
        except (TimeoutError, RemoteError) as exc:  # refused (e.g. a driver is e-stopped): nothing changed
            self.say(f"console: {'resume' if self.paused else 'pause'} refused: {_why(exc)}")

    def _stop(self, running: bool) -> None:
        self.end_run = True
        if running:
            self._end_episode("stopped by the operator (s)")
        self.say("console: stopping the episode; no more episodes" if running else "console: no more episodes")

    def _next(self, running: bool) -> None:
        if running:
            self._end_episode("stopped by the operator (n: next episode)")
            self.say("console: ending this episode; the next one follows")

    def _end_episode(self, reason: str) -> None:
        self.operator_stop = reason
        try:
            self.client.stop(reason)
        except (TimeoutError, RemoteError) as exc:
            self.say(f"console: the inference process did not take the stop: {_why(exc)}")

    def _estop(self, running: bool) -> None:
        answers = operator.estop(self.cell, reason="operator console (e)")  # first, before anything else
        self.estopped = True
        for a in answers:
            self.say(f"console: E-STOP {a.name}: {a.mode if a.ok else 'NOT CONFIRMED ' + (a.detail or a.mode)}")
        if not all(a.ok for a in answers):
            self.say("console: a driver did not confirm its e-stop: use the hardware e-stop")
        if running:
            # The episode fails on its own when a driver refuses its next chunk, but not while it is
            # paused (no chunks go out): end it, so no e-stopped episode reads "completed".
            self._end_episode("e-stop pressed on the console")

    def _reset(self, running: bool) -> None:
        names = [d.name for d in self.cell.drivers if _mode(self.cell, d.name) == "estop"]
        if not names:
            self.say("console: no driver has an e-stop latched")
            self.estopped = False
            return
        answers = [operator.reset_estop(self.cell, n) for n in names]
        for a in answers:
            self.say(f"console: reset {a.name}: {a.mode + ', stays disarmed' if a.ok else 'refused: ' + a.detail}")
        if all(a.ok for a in answers):
            self.estopped = False

    # ------------------------------------------------------------------ between episodes

    def wait_after_estop(self, broken: Callable[[], str] = lambda: "") -> bool:
        """After an e-stop no episode starts by itself: wait for n (go on) or s (end the run); r
        resets meanwhile. ``broken`` says why the cell cannot go on (a child died), ending the wait.
        Returns True to start the next episode."""
        self.say("console: e-stop pressed: r resets it (drivers stay disarmed), n starts the next episode, "
                 "s ends the run")
        while True:
            why = broken()
            if why:
                self.say(f"console: {why}: no more episodes")
                self.end_run = True
                return False
            for action in self.keys.read(0.2):
                if action == "next":
                    return True
                if action == "stop":
                    self.end_run = True
                    return False
                getattr(self, f"_{action}")(False)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()


def _mode(cell: CellConfig, name: str) -> str:
    answer = operator.status(cell, name)[0]
    return answer.mode if answer.ok else ""


def _why(exc: Exception) -> str:
    return exc.reason if isinstance(exc, RemoteError) else str(exc)
