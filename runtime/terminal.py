"""The operator's terminal: key presses one by one (cbreak mode) and stop signals.

Stdlib termios/select, so it works over SSH on a headless robot PC (no X11). Shared by
`armada run`, `armada teleop` and `armada record`.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any, Callable


class TerminalKeys:
    """Key presses from stdin in cbreak mode when it is a terminal, each read's bytes turned into
    keys by ``parse``. A context manager: the terminal's settings are restored on exit, whatever
    happens. Not a tty (a pipe, /dev/null): ``read`` returns nothing after its timeout."""

    def __init__(self, parse: Callable[[bytes], list[str]], fd: int | None = None):
        self.parse = parse
        self.fd = fd if fd is not None else _stdin_fd()
        self._saved: Any = None

    @property
    def interactive(self) -> bool:
        return self.fd is not None and os.isatty(self.fd)

    def __enter__(self) -> "TerminalKeys":
        if self.interactive:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)  # keys one by one, no echo; Ctrl-C still raises SIGINT
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def read(self, timeout_s: float) -> list[str]:
        if not self.interactive:
            time.sleep(timeout_s)
            return []
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return []
        return self.parse(os.read(self.fd, 64))


def _stdin_fd() -> int | None:
    try:
        return sys.stdin.fileno()
    except (ValueError, OSError, AttributeError):
        return None


class Interrupted(Exception):
    """A stop signal arrived while the operator's command was running."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM, SIGHUP and SIGINT end an operator's command the same way: the first one interrupts
    whatever runs (like Ctrl-C does, raising Interrupted), so the command stops its episode,
    teleop or recording and its children; later ones are noted but do not interrupt that clean-up
    (call ``defer`` when it starts). SIGKILL cannot be caught: the children's parent-death signal
    covers it (runtime.cli.die_with_parent)."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.interrupting = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
            if self.interrupting:
                raise Interrupted(signum)

    def defer(self) -> None:
        """From now on a signal is noted only: the clean-up that follows must run to its end."""
        self.interrupting = False

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def say(text: str) -> None:
    """A line for the operator on stderr; a closed terminal (SIGHUP) must not stop the clean-up."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
