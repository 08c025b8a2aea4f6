"""A stop that cannot hang: once a process of a cell is asked to stop, it has a few seconds.

A supervisor that is alive SIGKILLs a child that outstays its stop (runtime.supervisor). A child
whose supervisor was killed gets SIGTERM from the kernel (runtime.cli.die_with_parent) and nobody
is left to SIGKILL it: if its shutdown then hung (a thread that never returns, a socket still open
under ``ctx.term()``), it would live on holding its lock and sockets. So the stop signal also
starts this deadline: past it, every thread's stack goes to the process's log (the why), the
process removes its own socket files and lock (it holds the lock, so they are its own) and exits
with :data:`EXIT_STUCK`. Exiting never cuts torque: backends hold on close, and a device that loses
its driver holds or protectively stops on its own watchdog.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)

# Same as the supervisor's wait before SIGKILL: a stop that takes longer is stuck, not slow.
STOP_GRACE_S = 5.0
EXIT_STUCK = 3


class ExitDeadline:
    """Started by the first stop request; if the process is still here ``grace_s`` later, it exits."""

    def __init__(self, what: str, cleanup: Callable[[], None], grace_s: float = STOP_GRACE_S):
        self.what = what
        self.grace_s = grace_s
        self._cleanup = cleanup
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        if self._timer is not None:
            return  # a second SIGTERM does not push the deadline back
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.name = "exit-deadline"
        self._timer.daemon = True  # never what keeps the process alive
        self._timer.start()

    def _expire(self) -> None:
        log.critical("%s did not finish stopping within %.1f s; thread stacks follow, then it exits %d",
                     self.what, self.grace_s, EXIT_STUCK)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        try:
            self._cleanup()
        except Exception:  # noqa: BLE001 - leaving files behind must not keep a stuck process alive
            log.exception("%s: clean-up before the forced exit failed", self.what)
        os._exit(EXIT_STUCK)


def on_stop_signals(request_stop: Callable[[], None], deadline: ExitDeadline | None) -> None:
    """SIGTERM and SIGINT ask the process to stop and, when given, start its exit deadline."""
    def handler(*_: object) -> None:
        request_stop()
        if deadline is not None:
            deadline.start()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
