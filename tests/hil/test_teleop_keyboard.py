"""`armada teleop --source keyboard` on a real terminal (a pty): the operator confirms with 'y', selects
a joint, jogs it with arrow keys, holds with space, quits with 'q'; the follower's state shows the jog."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from armada.runtime.config import REPO_ROOT, load_cell
from armada.runtime.transport import Subscriber
from tests.hil.test_teleop_mock import teleop_cell

pytestmark = pytest.mark.hil


class Terminal:
    """A child process on a pty (its stdin), with its output collected in a thread."""

    def __init__(self, args: list[str]):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     cwd=REPO_ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"}, text=True)
        os.close(slave)
        self.out = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out += line

    def wait_for(self, text: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.out:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} not seen; output:\n{self.out}")
            time.sleep(0.02)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def newest(state: Subscriber) -> dict:
    """The newest state message: everything queued is read (one recv_latest reads a bounded batch)."""
    last = state.recv(2.0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        more = state.recv_latest(0.0)
        if more is None:
            return last
        last = more
    return last


def test_keyboard_teleop_on_a_terminal_confirms_jogs_holds_and_quits(short_tmp):
    cell_path = teleop_cell(short_tmp)
    term = Terminal([sys.executable, "-m", "armada.runtime.cli", "teleop", str(cell_path), "--run-dir", str(short_tmp),
                     "--source", "keyboard"])
    ctx = zmq.Context()
    try:
        term.wait_for("Start following? [y/N]")
        state = Subscriber(ctx, load_cell(cell_path, short_tmp).drivers[0].state)
        term.type("y")
        term.wait_for("following the keyboard")
        start = np.asarray(newest(state)["commanded"])
        for key in ["3", "\x1b[B", "\x1b[B", "1", "+"]:  # elbow down twice, base up once (0.02 each)
            term.type(key)
            time.sleep(0.15)
        term.wait_for("joint 1 +0.02")
        time.sleep(0.5)
        delta = np.asarray(newest(state)["commanded"]) - start
        term.type(" ")
        term.wait_for("holding: operator")
        term.type("q")
        assert term.proc.wait(20) == 0, term.out
        state.close()
    finally:
        term.close()
        ctx.destroy(linger=0)
    expected = np.zeros(7)
    expected[0], expected[2] = 0.02, -0.04
    assert np.abs(delta - expected).max() < 1e-3, (delta, term.out)
    assert "stopping the drivers it started" in term.out


def test_intervene_keys_take_over_a_running_episode_and_hand_it_back(short_tmp):
    from armada.runtime.inference.client import EpisodeClient
    from armada.runtime.supervisor import CellProcesses

    cell_path = teleop_cell(short_tmp)
    with CellProcesses(cell_path, short_tmp) as procs:
        procs.start_all()
        client = EpisodeClient(procs.ctx, procs.cell)
        term = Terminal([sys.executable, "-m", "armada.runtime.cli", "teleop", str(cell_path), "--run-dir",
                         str(short_tmp), "--intervene", "--yes"])
        try:
            term.wait_for("press i to take over")
            episode = client.start("auto", duration_s=6.0, arm=True)
            time.sleep(0.5)
            term.type("i")
            term.wait_for("following the leader")
            time.sleep(1.0)
            term.type("h")
            term.wait_for("handed back")
            term.type("q")
            assert term.proc.wait(20) == 0, term.out
            report = client.wait_report(episode, 15.0)
        finally:
            term.close()
            client.close()
    assert report["outcome"] == "completed" and report.get("interventions") == 1, report
    assert "starting them" not in term.out  # the cell's drivers already ran: teleop started none
