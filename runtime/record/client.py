"""Starting and talking to the recorder process (runtime/record/writer.py) from its parent.

JSON lines both ways over the child's stdin/stdout; its stderr goes to a log file in the run dir.
The child dies with us (parent-death signal, and EOF on its stdin); spawn it from a thread that
lives as long as we do (the main thread), as the kernel ties the signal to the spawning thread.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from armada.runtime.rundir import PARENT_PID_ENV, open_log

READY_TIMEOUT_S = 60.0  # importing lerobot (datasets, torch) takes a while on a small machine


class RecorderError(RuntimeError):
    pass


class RecorderClient:
    def __init__(self, cell_path: Path, run_dir: Path, dataset: Path, repo_id: str, *, fps: int | None = None,
                 min_free_mb: float | None = None, ram_budget_mb: float | None = None,
                 log_path: Path | None = None):
        args = [sys.executable, "-m", "armada.runtime.record.writer", str(cell_path), "--run-dir", str(run_dir),
                "--dataset", str(dataset), "--repo-id", repo_id]
        for flag, value in (("--fps", fps), ("--min-free-mb", min_free_mb), ("--ram-budget-mb", ram_budget_mb)):
            if value is not None:
                args += [flag, str(value)]
        self.log_path = log_path or Path(run_dir) / "logs" / "recorder.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), "HF_HUB_OFFLINE": "1"}
        with open_log(self.log_path) as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
                                         text=True, bufsize=1, process_group=0)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ready: dict[str, Any] | None = None
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True, name="recorder-events").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.events.put(ev)
        self.events.put({"event": "exited", "code": self.proc.wait()})

    def send(self, cmd: str, **fields: Any) -> None:
        if self.proc.poll() is not None:
            raise RecorderError(f"the recorder process exited ({self.proc.returncode}); see {self.log_path}")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise RecorderError(f"the recorder process is gone ({exc}); see {self.log_path}") from None

    def wait_for(self, names: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """The next event named in ``names``; a fatal error or exit raises; other events are kept."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RecorderError(f"the recorder sent no {'/'.join(names)} within {timeout_s:.0f} s; "
                                    f"see {self.log_path}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["event"] in names:
                return ev
            if ev["event"] == "error":
                self.errors.append(ev["error"])
                if ev.get("fatal"):
                    raise RecorderError(ev["error"])
            if ev["event"] == "exited":
                self.events.put(ev)
                raise RecorderError(f"the recorder process exited ({ev['code']}) "
                                    f"{'after: ' + self.errors[-1] if self.errors else ''}; see {self.log_path}")

    def poll_events(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
        self.ready = self.wait_for(("ready",), timeout_s)
        return self.ready

    def close(self, timeout_s: float = 120.0) -> int:
        """Ask the recorder to finish (the queue is written out first) and wait for it to exit."""
        if self.proc.poll() is None:
            try:
                self.send("close")
            except RecorderError:
                pass
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
