"""A stop that hangs still ends: the process names where it was stuck, removes its own files, exits 3.

Real processes: a cell driver whose shutdown never returns, stopped by SIGTERM (what the kernel sends
when its supervisor is killed, and nobody is left to SIGKILL it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armada.runtime.config import REPO_ROOT, SCRIPTED_CELL
from armada.runtime.exit_deadline import EXIT_STUCK, STOP_GRACE_S
from armada.runtime.supervisor import PARENT_PID_ENV

pytestmark = pytest.mark.hil

_HANGING_DRIVER = """
import sys, time
from armada.drivers.core import process
process.DriverProcess._shutdown = lambda self: time.sleep(3600)  # the hang: e.g. ctx.term() on a socket left open
from armada.runtime.cli import main
sys.exit(main(["driver", sys.argv[1], "--name", "arm", "--run-dir", sys.argv[2]]))
"""

_CLEAN_DRIVER = """
import sys
from armada.runtime.cli import main
sys.exit(main(["driver", sys.argv[1], "--name", "arm", "--run-dir", sys.argv[2]]))
"""


def _start(script: str, run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    proc = subprocess.Popen([sys.executable, "-c", script, str(SCRIPTED_CELL), str(run_dir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (run_dir / "arm-cmd").exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the driver never bound its socket"
        time.sleep(0.05)
    time.sleep(0.3)  # its signal handlers go in just after the sockets
    return proc


def test_a_driver_whose_stop_hangs_dumps_its_stacks_removes_its_files_and_exits_stuck(short_tmp):
    proc = _start(_HANGING_DRIVER, short_tmp)
    try:
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_GRACE_S + 10)
        took = time.monotonic() - t
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(5)
    assert code == EXIT_STUCK, out
    assert took >= STOP_GRACE_S - 0.5, took  # it waited for the stop first
    assert "did not finish stopping" in out and "driver-arm" in out
    assert "<lambda>" in out and "Thread" in out  # where it hung, for whoever reads the log
    assert not (short_tmp / "arm-cmd").exists() and not (short_tmp / "arm-state").exists()
    assert not (short_tmp / "driver-arm.lock").exists()


def test_a_second_sigterm_does_not_push_the_deadline_back(short_tmp):
    proc = _start(_HANGING_DRIVER, short_tmp)
    try:
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(STOP_GRACE_S * 0.6)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_GRACE_S + 10)
        took = time.monotonic() - t
    finally:
        proc.kill()
        proc.wait(5)
    assert code == EXIT_STUCK
    assert took < STOP_GRACE_S * 1.5, took


def test_a_driver_that_stops_in_time_exits_0_without_the_deadline(short_tmp):
    proc = _start(_CLEAN_DRIVER, short_tmp)
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_GRACE_S + 10)
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait(5)
    assert code == 0, out
    assert "did not finish stopping" not in out
    assert not (short_tmp / "arm-cmd").exists() and not (short_tmp / "driver-arm.lock").exists()
