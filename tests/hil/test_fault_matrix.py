"""The fault matrix: `armada run` on the scripted cell (mock arm, two cameras, scripted policy) while
one of its processes is killed (-9) or stopped for a while (SIGSTOP, then SIGCONT), or while
`armada run` itself is signalled. For each: what the run reports, its exit code, whether the arm
stopped moving, and what was left behind (processes by pid, socket and lock files).

The table is printed at the end of the module (and each row with -s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zmq

from armada.runtime.config import REPO_ROOT, SCRIPTED_CELL, load_cell
from tests.hil.helpers import StateRecorder

pytestmark = [pytest.mark.hil, pytest.mark.slow]

EPISODE_S = 6.0
FAULT_AFTER_S = 1.5  # into the running episode: mid-motion
STOP_FOR_S = 1.0  # how long a SIGSTOP-ed process stays stopped
# From the fault until the arm no longer moves: lease ttl (0.3 s) + braking + noticing the dead
# child (0.1 s) + stopping the episode, on a loaded two-core machine.
STOPPED_MOVING_WITHIN_S = 3.0


@dataclass(frozen=True)
class Row:
    target: str  # driver, camera, infer, parent, or group (the parent's process group)
    action: str  # kill, stop, or a signal name for the parent
    exit_code: int  # of `armada run` (Popen's: -9 is killed by SIGKILL)
    says: tuple[str, ...]  # in its output
    # Also accepted: another exit code with what it must then say (see the camera stop row).
    or_else: tuple[int, tuple[str, ...]] | None = None


# Whenever `armada run` does not complete (exit code not 0), the arm must stop moving soon after
# the fault: the episode does not go on. When it completes, the episode went on after the fault.


ROWS = [
    Row("driver", "kill", 1, ("driver arm died (killed by SIGKILL)", "failed")),
    Row("camera", "kill", 1, ("camera front died (killed by SIGKILL)", "failed")),
    Row("infer", "kill", 1, ("inference died (killed by SIGKILL)", "failed")),
    # A stopped driver publishes nothing: the episode fails on its silence (it is dead or hung).
    Row("driver", "stop", 1, ("failed", "arm")),
    # A stopped camera only pauses the episode: frames are stale, then fresh again. On a heavily
    # loaded machine the inference loop itself may stall past its progress bound while paused;
    # then heartbeats are withheld, the lease lapses, the arm holds and the episode fails saying so.
    Row("camera", "stop", 0, ("paused", "completed"), or_else=(1, ("paused", "failed", "lease"))),
    # A stopped inference process sends no heartbeats: the lease lapses, the arm holds; when it
    # runs again its lease is gone and the episode fails saying so.
    Row("infer", "stop", 1, ("failed", "lease")),
    Row("parent", "SIGTERM", 128 + signal.SIGTERM, ("stopped by SIGTERM",)),
    Row("parent", "SIGHUP", 128 + signal.SIGHUP, ("stopped by SIGHUP",)),
    Row("parent", "SIGINT", 128 + signal.SIGINT, ("stopped by SIGINT",)),
    Row("parent", "SIGKILL", -signal.SIGKILL, ()),
    # Ctrl-C at a terminal: SIGINT to the whole foreground process group. The children are in
    # their own groups, so only `armada run` gets it and stops them in order.
    Row("group", "SIGINT", 128 + signal.SIGINT, ("stopped by SIGINT",)),
]

TABLE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if not TABLE or capture is None:
        return
    with capture.global_and_fixture_disabled():  # shown without -s too
        print("\n\nfault matrix (armada run, scripted cell):\n" + _HEADER + "\n" + "\n".join(TABLE), flush=True)


_HEADER = f"{'target':7} {'action':8} {'exit':>4}  {'arm stopped after':>17}  {'left behind':12} reported"


def _children(ppid: int) -> dict[str, int]:
    """{'driver arm': pid, 'camera front': pid, 'infer': pid, ...} of `armada run`'s children."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(stat.rsplit(") ", 1)[1].split()[1]) != ppid or "armada.runtime.cli" not in argv:
            continue
        role = argv[argv.index("armada.runtime.cli") + 1]
        name = argv[argv.index("--name") + 1] if "--name" in argv else role
        out[role if role == "infer" else f"{role} {name}"] = int(entry.name)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class _Output:
    """Collects a process's stdout+stderr lines in a thread, so waiting for a line never blocks."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(needle in line for line in self.lines):
            assert time.monotonic() < deadline, f"{needle!r} not printed:\n" + "\n".join(self.lines)
            time.sleep(0.02)

    @property
    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self.lines)


def _last_motion_s(states: list[dict], after_ns: int) -> float:
    """Seconds from ``after_ns`` to the last state in which the arm still moved (commanded velocity)."""
    moving = [m["mono_ns"] for m in states
              if m["mono_ns"] > after_ns and np.max(np.abs(np.asarray(m["velocity"]))) > 1e-6]
    return (max(moving) - after_ns) * 1e-9 if moving else 0.0


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.target}-{r.action}" for r in ROWS])
def test_fault_matrix(short_tmp, row):
    cell = load_cell(SCRIPTED_CELL, short_tmp)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "run", str(SCRIPTED_CELL), "--duration",
                            str(EPISODE_S), "--run-dir", str(short_tmp)], cwd=REPO_ROOT, env=env, text=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)  # a group of its own, as a shell gives a job
    out = _Output(run)
    ctx = zmq.Context()
    rec = None
    children: dict[str, int] = {}
    try:
        out.wait_for("all processes answer", 60.0)
        children = _children(run.pid)
        assert set(children) == {"driver arm", "camera front", "camera wrist", "infer"}, children
        rec = StateRecorder(ctx, cell.drivers[0].state)
        rec.wait_mode("running", 15.0)
        time.sleep(FAULT_AFTER_S)
        fault_ns = time.monotonic_ns()
        _inject(row, run, children)
        code = run.wait(EPISODE_S + 30.0)
        text = out.text
        time.sleep(0.3)  # the last states in flight
        states = rec.stop()
        rec = None
    finally:
        if rec is not None:
            rec.stop()
        ctx.destroy(linger=0)
        if run.poll() is None:
            run.kill()
            run.wait(5)
        # Children stopping on their own (a parent-death SIGTERM) get time to finish their clean-up.
        deadline = time.monotonic() + 10.0
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        orphans = sorted(name for name, pid in children.items() if _alive(pid))
        for pid in children.values():  # never leave anything running, whatever failed above
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)

    left = sorted(p.name for p in short_tmp.iterdir() if p.is_socket() or p.suffix == ".lock")
    moved_for = _last_motion_s(states, fault_ns)
    reported = next((line for line in reversed(text.splitlines()) if "failed" in line or "completed" in line
                     or "stopped by" in line), "(nothing)")
    TABLE.append(f"{row.target:7} {row.action:8} {code:>4}  {moved_for:>15.2f} s  {','.join(left) or 'nothing':12} "
                 f"{reported.strip()[:90]}")
    print(_HEADER + "\n" + TABLE[-1])

    assert "Traceback" not in text, text
    expected = dict([(row.exit_code, row.says), row.or_else] if row.or_else else [(row.exit_code, row.says)])
    assert code in expected, text
    for needle in expected[code]:
        assert needle in text, f"{needle!r} missing:\n{text}"
    assert orphans == [], f"still running after `armada run` ended: {orphans}"
    # The killed parent cannot remove its own lock file (nobody holds it: the next run takes it).
    assert left == (["run.lock"] if row.action == "SIGKILL" else []), left
    if code != 0:
        # A stopped process may end the episode only once it runs again: count from then.
        bound = STOPPED_MOVING_WITHIN_S + (STOP_FOR_S if row.action == "stop" else 0.0)
        assert moved_for < bound, f"the arm kept moving {moved_for:.2f} s after the fault"
    else:
        assert moved_for > STOP_FOR_S, "the episode should have gone on after the pause"


def _inject(row: Row, run: subprocess.Popen, children: dict[str, int]) -> None:
    if row.target == "parent":
        run.send_signal(getattr(signal, row.action))
        return
    if row.target == "group":
        os.killpg(run.pid, getattr(signal, row.action))
        return
    pid = children["infer" if row.target == "infer" else f"{row.target} {'arm' if row.target == 'driver' else 'front'}"]
    if row.action == "kill":
        os.kill(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGSTOP)
        time.sleep(STOP_FOR_S)
        os.kill(pid, signal.SIGCONT)
