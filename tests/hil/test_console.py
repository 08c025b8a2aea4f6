"""The operator console of `armada run` on a real terminal (a pty as stdin), on the scripted mock
cell: p pauses (the policy lets go, the driver holds) and resumes, e e-stops (latched, the episode
fails saying so, no next episode starts by itself), r resets (the driver stays disarmed), n ends
the episode and starts the next, s ends the run. A piped run reads no keys, as before."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from armada.runtime import operator_commands as operator
from armada.runtime.config import REPO_ROOT
from tests.hil.test_teleop_keyboard import Terminal

pytestmark = pytest.mark.hil

CELL = REPO_ROOT / "configs" / "cells" / "scripted.yaml"


def armada_run(run_dir, *args: str) -> Terminal:
    return Terminal([sys.executable, "-m", "armada.runtime.cli", "run", str(CELL), "--run-dir", str(run_dir), *args])


def driver_status(run_dir, cell: Path = CELL) -> operator.DriverAnswer:
    return operator.status(operator.load_running_cell(cell, run_dir))[0]


def wait_mode(run_dir, mode: str, timeout_s: float = 5.0, cell: Path = CELL) -> operator.DriverAnswer:
    deadline = time.monotonic() + timeout_s
    while True:
        answer = driver_status(run_dir, cell)
        if answer.mode == mode or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def test_pause_resume_estop_and_reset_from_the_keyboard(short_tmp):
    term = armada_run(short_tmp, "--episodes", "2", "--duration", "15")
    try:
        term.wait_for("keys: p pause/resume")
        term.wait_for("routed to task")
        assert wait_mode(short_tmp, "running", 10.0).mode == "running"  # chunks flowing: the episode is in its loop
        term.type("p")
        term.wait_for("console: episode 1 paused")
        held = wait_mode(short_tmp, "armed")
        assert held.mode == "armed" and "lease held by" not in held.detail, held  # holding, no policy lease
        term.wait_for("| arm armed")  # the status line shows the driver holding
        term.wait_for("PAUSED (p resumes)")  # the status line says so while no chunk comes
        term.type("p")
        term.wait_for("console: resumed after")
        assert wait_mode(short_tmp, "running").mode == "running"
        term.type("e")
        term.wait_for("console: E-STOP arm: estop")
        term.wait_for("e-stop pressed on the console)")  # the episode's outcome says why it ended
        assert "episode 1: completed" not in term.out
        term.wait_for("n starts the next episode")
        time.sleep(0.5)
        assert driver_status(short_tmp).mode == "estop"  # latched: the run started nothing by itself
        assert "episode 2" not in term.out
        term.type("r")
        term.wait_for("console: reset arm: idle, stays disarmed")
        assert driver_status(short_tmp).mode == "idle"
        term.type("s")
        assert term.proc.wait(30) == 1, term.out  # the episode failed
    finally:
        term.close()
    assert "episode 2" not in term.out, term.out
    assert "interventions      1" in term.out, term.out


def test_next_ends_the_episode_and_stop_ends_the_run(short_tmp):
    term = armada_run(short_tmp, "--episodes", "3", "--duration", "30")
    try:
        term.wait_for("routed to task")
        time.sleep(0.5)
        term.type("n")
        term.wait_for("episode 1: stopped (stopped by the operator (n: next episode))")
        term.wait_for("episode 2: routed to task")
        time.sleep(0.5)
        term.type("s")
        term.wait_for("episode 2: stopped (stopped by the operator (s))")
        assert term.proc.wait(30) == 1, term.out  # stopped episodes are not completed ones
    finally:
        term.close()
    assert "the operator ended the run after episode 2" in term.out, term.out
    assert "episode 3" not in term.out, term.out


def test_a_piped_run_reads_no_keys(short_tmp):
    result = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "run", str(CELL), "--run-dir", str(short_tmp),
                             "--duration", "1"], input="pesn", capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "episode 1: completed" in result.stdout
    assert "keys:" not in result.stdout and "console:" not in result.stdout


def two_driver_cell(folder: Path) -> Path:
    """The scripted cell with a second mock arm: a cell with two driver processes."""
    data = yaml.safe_load(CELL.read_text())
    second = dict(copy.deepcopy(data["drivers"][0]), name="arm2", state="ipc://{run_dir}/arm2-state", cmd="ipc://{run_dir}/arm2-cmd")
    data["drivers"].append(second)
    path = folder / "two_arms.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_estop_while_paused_and_reset_reach_every_driver_process(short_tmp):
    cell = two_driver_cell(short_tmp)
    term = Terminal([sys.executable, "-m", "armada.runtime.cli", "run", str(cell), "--run-dir", str(short_tmp),
                     "--episodes", "2", "--duration", "15"])
    try:
        term.wait_for("2 driver(s)")
        term.wait_for("routed to task")
        assert wait_mode(short_tmp, "running", 10.0, cell).mode == "running"
        term.type("p")  # paused first: no chunk goes out that a driver could refuse
        term.wait_for("console: episode 1 paused")
        term.type("e")
        term.wait_for("n starts the next episode")
        assert "e-stop pressed on the console)" in term.out and "episode 1: completed" not in term.out, term.out
        running = operator.load_running_cell(cell, short_tmp)
        for name in ("arm", "arm2"):
            assert f"console: E-STOP {name}: estop" in term.out, term.out
        assert [a.mode for a in operator.status(running)] == ["estop", "estop"]
        term.type("r")
        for name in ("arm", "arm2"):
            term.wait_for(f"console: reset {name}: idle, stays disarmed")
        assert [a.mode for a in operator.status(running)] == ["idle", "idle"]
        term.type("s")
        assert term.proc.wait(30) == 1, term.out
    finally:
        term.close()
