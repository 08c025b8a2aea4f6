"""Policy calls with a deadline: the call runs in a thread of its own, the episode loop waits.

A policy is arbitrary code (a model, a remote server, a bug): it may never return. The episode
loop must go on watching its inputs, the stop flag and the time while it waits, and give up at
the deadline; the call itself cannot be killed, so its thread is abandoned and the policy is
marked busy until it returns, and no new episode may use it meanwhile.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

WAIT_SLICE_S = 0.005


class PolicyTimeout(Exception):
    """A policy call did not return within its deadline; the message names the call and the deadline."""


class Stopped(Exception):
    """The stop flag was raised while waiting."""


class PolicyCaller:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: tuple[str, float] | None = None  # (call, monotonic start) of a call still running

    def busy(self) -> str | None:
        """Which call is still running and for how long, or None."""
        with self._lock:
            if self._busy is None:
                return None
            name, since = self._busy
        return f"{name} (running for {time.monotonic() - since:.1f} s)"

    def call(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...], deadline_s: float,
             stop: threading.Event, tick: Callable[[], None]) -> Any:
        """``fn(*args)``, or PolicyTimeout after ``deadline_s``, or Stopped once ``stop`` is set.

        ``tick`` runs every few milliseconds while waiting (poll inputs, stamp progress); what it
        raises ends the wait too.
        """
        with self._lock:
            if self._busy is not None:
                raise PolicyTimeout(f"policy {self._busy[0]} from an earlier episode has still not returned "
                                    f"after {time.monotonic() - self._busy[1]:.1f} s; restart the inference process")
            self._busy = (name, time.monotonic())
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn(*args)
            except BaseException as exc:  # handed to the waiting thread, which decides
                box["error"] = exc
            finally:
                with self._lock:
                    self._busy = None
                done.set()

        threading.Thread(target=run, daemon=True, name=f"policy-{name}").start()
        end = time.monotonic() + deadline_s
        while not done.wait(WAIT_SLICE_S):
            tick()
            if stop.is_set():
                raise Stopped(f"stopped while the policy's {name} call was running")
            if time.monotonic() > end:
                raise PolicyTimeout(f"policy {name} did not return within its deadline of {deadline_s:.1f} s")
        if "error" in box:
            raise box["error"]
        return box["result"]
