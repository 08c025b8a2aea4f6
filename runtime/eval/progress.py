"""Progress lines: which stage, how far, success so far, and the time left at the current pace."""

from __future__ import annotations

import time


def duration_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"


class Progress:
    """One line per finished unit of work: ``label i/N  success k/i  ETA m:ss  note``."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.done = 0
        self.successes = 0
        self.started = time.monotonic()

    def eta_s(self) -> float:
        if self.done == 0:
            return 0.0
        return (time.monotonic() - self.started) / self.done * max(0, self.total - self.done)

    def step(self, success: bool, note: str = "") -> str:
        self.done += 1
        self.successes += bool(success)
        line = (f"{self.label} {self.done}/{self.total}  success {self.successes}/{self.done}  "
                f"ETA {duration_text(self.eta_s())}" + (f"  {note}" if note else ""))
        print(line, flush=True)
        return line
