"""`armada status`, `armada estop` and `armada reset-estop` against a real driver process: the
operator's way to see a latched e-stop (also one kept across a driver restart) and to reset it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from armada.runtime.config import REPO_ROOT, SCRIPTED_CELL
from armada.runtime.supervisor import CellProcesses

pytestmark = pytest.mark.hil


def _armada(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "armada.runtime.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def _op(command: str, run_dir, *extra: str) -> subprocess.CompletedProcess:
    return _armada(command, str(SCRIPTED_CELL), "--run-dir", str(run_dir), *extra)


def test_estop_latches_survives_a_driver_restart_and_is_reset_only_on_request(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        driver = procs.spawn("driver", "arm")
        procs.wait_ready()
        status = _op("status", short_tmp)
        assert status.returncode == 0, status.stderr
        assert "idle" in status.stdout

        pressed = _op("estop", short_tmp)
        assert pressed.returncode == 0, pressed.stdout + pressed.stderr
        assert "estop" in pressed.stdout
        assert "estop command: operator" in _op("status", short_tmp).stdout

        driver.proc.kill()  # a crash must not clear a software e-stop
        driver.proc.wait(timeout=10)
        procs.children.remove(driver)
        procs.spawn("driver", "arm")
        procs.wait_ready()
        after = _op("status", short_tmp)
        assert "estop" in after.stdout and "latched before restart" in after.stdout, after.stdout

        reset = _op("reset-estop", short_tmp, "--name", "arm")
        assert reset.returncode == 0, reset.stdout + reset.stderr
        assert "idle" in reset.stdout  # disarmed: the operator arms again explicitly
        assert "idle" in _op("status", short_tmp).stdout


def test_operator_commands_name_a_driver_that_does_not_answer(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp):  # nothing started: no driver listens
        pressed = _op("estop", short_tmp)
    assert pressed.returncode == 1
    assert "arm" in pressed.stdout and "no reply" in pressed.stdout
    assert "Traceback" not in pressed.stderr
