"""Process lifetime and the run dir, with real processes: one instance per run dir, children die with
their parent, a default run dir that is private, and nothing left behind after a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from armada.runtime.config import REPO_ROOT, SCRIPTED_CELL
from armada.runtime.exit_deadline import STOP_GRACE_S
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.supervisor import PARENT_PID_ENV, CellProcesses
from armada.runtime.transport import CommandClient

pytestmark = pytest.mark.hil


def _armada(*args: str, env: dict | None = None, cwd: Path = REPO_ROOT, timeout_s: float = 30.0):
    return subprocess.run([sys.executable, "-m", "armada.runtime.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, env=env)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _leftovers(run_dir: Path) -> list[str]:
    """Socket and lock files in a run dir (logs and e-stop latches are meant to stay)."""
    return sorted(p.name for p in run_dir.iterdir() if p.is_socket() or p.suffix == ".lock")


def test_a_second_driver_on_the_same_run_dir_is_refused_and_the_first_keeps_its_sockets(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        first = procs.spawn("driver", "arm")
        procs.wait_ready()
        t = time.monotonic()
        second = _armada("driver", str(SCRIPTED_CELL), "--name", "arm", "--run-dir", str(short_tmp))
        assert time.monotonic() - t < 15
        assert second.returncode == 2, second.stderr
        assert f"pid {first.proc.pid}" in second.stderr and "driver-arm" in second.stderr
        assert "Traceback" not in second.stderr
        client = CommandClient(procs.ctx, procs.cell.drivers[0].cmd, default_timeout_s=1.0)
        assert client.request("hello", version=PROTOCOL_VERSION, role="test")["mode"] == "idle"  # still the first
        client.close()
        assert first.proc.poll() is None


def test_a_second_supervisor_on_the_same_run_dir_is_refused_naming_the_first(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp):
        second = _armada("run", str(SCRIPTED_CELL), "--duration", "1", "--run-dir", str(short_tmp))
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"pid {os.getpid()}" in second.stderr and "run.lock" in second.stderr
    assert "Traceback" not in second.stderr
    assert not any(p.name.endswith(".log") for p in (short_tmp / "logs").iterdir())  # it started nothing


def test_armada_run_leaves_no_socket_or_lock_files_after_a_normal_stop(short_tmp):
    result = _armada("run", str(SCRIPTED_CELL), "--duration", "1", "--run-dir", str(short_tmp), timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _leftovers(short_tmp) == []
    assert sorted(p.name for p in (short_tmp / "logs").iterdir()) == ["arm.log", "front.log", "infer.log",
                                                                      "wrist.log"]


def test_a_driver_without_run_dir_uses_the_private_default_not_the_current_folder(short_tmp, tmp_path):
    env = os.environ | {"XDG_RUNTIME_DIR": str(short_tmp)}
    env.pop(PARENT_PID_ENV, None)
    run_dir = short_tmp / f"armada-{os.geteuid()}" / "scripted"
    proc = subprocess.Popen([sys.executable, "-m", "armada.runtime.cli", "driver", str(SCRIPTED_CELL), "--name", "arm"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        while not (run_dir / "arm-cmd").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the driver never bound its socket in the default run dir"
            time.sleep(0.05)
        assert list(tmp_path.iterdir()) == []  # nothing like ./{run_dir}/ in the current folder
        for folder in (run_dir, run_dir.parent):
            assert os.stat(folder).st_mode & 0o777 == 0o700, folder
        assert (run_dir / "driver-arm.lock").read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait(5)
    assert _leftovers(run_dir) == []


def test_a_run_dir_open_to_other_users_is_refused_before_anything_starts(short_tmp):
    os.chmod(short_tmp, 0o755)
    for args in (("run", str(SCRIPTED_CELL), "--duration", "1"), ("driver", str(SCRIPTED_CELL), "--name", "arm"),
                 ("camera", str(SCRIPTED_CELL), "--name", "front"), ("infer", str(SCRIPTED_CELL))):
        result = _armada(*args, "--run-dir", str(short_tmp))
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert str(short_tmp) in result.stderr and "0755" in result.stderr and "--run-dir" in result.stderr
        assert "Traceback" not in result.stderr
        assert list(short_tmp.iterdir()) == [], args


def test_a_child_whose_supervisor_is_already_gone_does_not_start(short_tmp):
    env = os.environ | {PARENT_PID_ENV: "1"}  # claims a parent it does not have: the race, taken for real
    t = time.monotonic()
    result = _armada("driver", str(SCRIPTED_CELL), "--name", "arm", "--run-dir", str(short_tmp), env=env)
    assert time.monotonic() - t < 10
    assert result.returncode != 0 and "supervisor" in result.stderr, result.stderr
    assert not (short_tmp / "arm-cmd").exists()


_PARENT = """
import sys, time
from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.supervisor import CellProcesses
procs = CellProcesses(SCRIPTED_CELL, sys.argv[1])
procs.spawn("driver", "arm")
procs.wait_ready()
print(procs.children[0].proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_children_die_with_their_supervisor_whatever_kills_it(short_tmp, sig):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(short_tmp)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        driver_pid = int(parent.stdout.readline())
        assert _alive(driver_pid)
        parent.send_signal(sig)
        parent.wait(10)
        # The kernel SIGTERMs it; a stop that hangs ends at the exit deadline (test_exit_deadline.py).
        if not _wait_dead(driver_pid, STOP_GRACE_S + 10.0):
            log = (short_tmp / "logs" / "arm.log").read_text()[-4000:]
            pytest.fail(f"driver {driver_pid} outlived its supervisor ({sig.name}); its log ends:\n{log}")
        log = (short_tmp / "logs" / "arm.log").read_text()
        if "did not finish stopping" in log:  # it died, but only at its exit deadline: show where it hung
            warnings.warn(f"the driver's stop hung until its exit deadline ({sig.name}); its log ends:\n{log[-4000:]}")
    finally:
        parent.kill()
        parent.wait(5)
    assert not (short_tmp / "arm-cmd").exists() and not (short_tmp / "driver-arm.lock").exists()
