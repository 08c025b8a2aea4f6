"""A policy that never returns, in `armada infer` as production runs it: the call's deadline from
the cell fails the episode and hands control back; SIGTERM still ends the process promptly."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from armada.runtime.config import load_cell
from armada.runtime.inference.client import EpisodeClient
from tests.hil.helpers import variant_cell
from tests.unit.test_inference_fakes import FakeDriver

pytestmark = pytest.mark.hil

# The scripted policy, except that its second infer call never returns.
HANG = """
    import logging, threading
    logging.basicConfig(level=logging.INFO)
    from armada.runtime.inference.policy import ScriptedPolicy
    real_infer, calls = ScriptedPolicy.infer, []
    def infer(self, obs):
        calls.append(1)
        if len(calls) == 2:
            threading.Event().wait()  # hung for good: a model stuck in a driver call, a dead server
        return real_infer(self, obs)
    ScriptedPolicy.infer = infer
    from armada.runtime.inference.process import run_inference
    run_inference({cell!r}, {run_dir!r})
"""


@pytest.fixture
def hung(ctx, short_tmp):
    """(cell, fake driver, process, log path): `armada infer` with no cameras, a FakeDriver, and a
    policy that hangs on its second chunk, with a 0.8 s deadline from the cell."""
    cell_path = variant_cell(short_tmp, cameras=[], inference__policy_timeout_s=0.8)
    cell = load_cell(cell_path, short_tmp)
    d = cell.drivers[0]
    driver = FakeDriver(ctx, d.cmd, d.state)
    log_path = short_tmp / "infer.log"
    code = textwrap.dedent(HANG).format(cell=str(cell_path), run_dir=str(short_tmp))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    client = EpisodeClient(ctx, cell)
    client.ctl.default_timeout_s = 10.0  # the first request waits for the process to come up
    yield client, driver, proc, log_path
    client.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    driver.close()


def test_a_hung_policy_fails_the_episode_at_the_cells_deadline_and_hands_control_back(hung):
    client, driver, proc, log_path = hung
    episode = client.start("wave", duration_s=30.0, arm=True)
    started = time.monotonic()
    report = client.wait_report(episode, timeout_s=15)
    assert time.monotonic() - started < 6.0
    assert report["outcome"] == "failed: policy infer did not return within its deadline of 0.8 s", report
    assert report["chunks"] == 1
    assert driver.lease is None and {"disarm", "release"} <= set(driver.kinds())
    # The call is still hung: the next episode is refused, saying why, and the process stays up.
    second = client.start("wave", duration_s=5.0, arm=True)
    report = client.wait_report(second, timeout_s=15)
    assert "has not returned" in report["outcome"] and "restart the inference process" in report["outcome"]
    assert proc.poll() is None, log_path.read_text()


def test_sigterm_ends_the_process_promptly_while_a_policy_call_hangs(hung):
    client, driver, proc, log_path = hung
    client.start("wave", duration_s=30.0, arm=True)
    deadline = time.monotonic() + 10
    while len(driver.times("trajectory")) < 1:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.02)
    time.sleep(0.3)  # inside the hung second call, before its deadline
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=10)
    assert time.monotonic() - sent < 3.0
    assert code == 0, log_path.read_text()
    assert "release" in driver.kinds()
