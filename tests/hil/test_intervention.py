"""Intervention through real processes: the operator takes the lease mid-episode and hands it back.

The scripted cell: one mock arm (500 Hz), two synthetic cameras, the scripted policy. A second
client stands in for teleop: it takes the driver's lease once the inference side has let go,
servoes near the current pose, and releases; then the episode resumes and completes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from armada.runtime.config import SCRIPTED_CELL, load_embodiment
from armada.runtime.inference.client import EpisodeClient
from armada.runtime.protocol import ErrorCode
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import CommandClient, RemoteError
from tests.hil.helpers import StateRecorder

pytestmark = pytest.mark.hil


class Teleop:
    """The stand-in teleop: its own connection, its own lease (bound to that connection)."""

    def __init__(self, ctx, endpoint: str):
        self.cmd = CommandClient(ctx, endpoint, default_timeout_s=1.0)
        self.lease: str | None = None

    def acquire(self) -> None:
        self.lease = self.cmd.request("acquire", client="teleop")["lease"]

    def servo_near(self, rec: StateRecorder, seconds: float, step: float = 0.002) -> None:
        """Servo targets creeping away from the commanded pose, every 20 ms (each renews the lease)."""
        start = rec.latest()["commanded"].copy()
        end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < end:
            k += 1
            target = start.copy()
            target[0] += step * k  # 0.1 rad/s on the base joint: well inside its limit
            self.cmd.request("servo", lease=self.lease, target=target)
            time.sleep(0.02)

    def heartbeat(self) -> None:
        self.cmd.request("heartbeat", lease=self.lease)

    def release(self) -> None:
        self.cmd.request("release", lease=self.lease)
        self.lease = None

    def close(self) -> None:
        self.cmd.close()


def _holders(states: list[dict]) -> list[str]:
    """The sequence of lease holders seen on the state stream, repeats collapsed ('' = free)."""
    seq: list[str] = []
    for m in states:
        holder = m.get("lease_holder", "")
        if not seq or seq[-1] != holder:
            seq.append(holder)
    return seq


def test_intervention_hands_the_lease_to_teleop_and_back_without_a_jump(short_tmp):
    emb = load_embodiment("mock_arm")
    events: list[tuple[float, str, dict]] = []
    refused: list[str] = []
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        rec = StateRecorder(procs.ctx, procs.cell.drivers[0].state)
        client = EpisodeClient(procs.ctx, procs.cell)
        teleop = Teleop(procs.ctx, procs.cell.drivers[0].cmd)

        def operator() -> None:
            time.sleep(1.5)  # the policy is moving the arm by now
            assert client.intervene() == episode
            assert client.ctl.request("status")["intervened"] is True
            teleop.acquire()  # free now: the inference side released it
            teleop.servo_near(rec, 1.0)
            try:
                client.ctl.request("resume")
            except RemoteError as exc:
                refused.append(f"{exc.code}: {exc.reason}")
            teleop.heartbeat()
            time.sleep(0.1)  # holding
            teleop.release()
            assert client.resume() > 1.0

        episode = client.start("wave", duration_s=5.0, arm=True)
        side = threading.Thread(target=operator)
        side.start()
        report = client.wait_report(episode, timeout_s=30, on_event=lambda e, d: events.append((time.monotonic(), e, d)))
        side.join(timeout=10)
        client.close()
        teleop.close()
        rec.wait_mode("idle", 3.0)
        states = rec.stop()

    assert report["outcome"] == "completed", report
    assert report["interventions"] == 1
    assert 1.0 < report["intervened_s"] < 2.5, report["intervened_s"]
    assert refused and refused[0].startswith(f"{ErrorCode.BAD_STATE}:") and "'teleop'" in refused[0], refused

    names = [e for _, e, _ in events]
    assert names.count("intervention_started") == 1 and names.count("intervention_ended") == 1, names
    started_at = next(t for t, e, _ in events if e == "intervention_started")
    ended_at, ended = next((t, d) for t, e, d in events if e == "intervention_ended")
    assert ended["episode"] == episode and ended["resumed"] is True
    # No chunk while the operator had the arm, chunks again after the hand-back.
    assert not [t for t, e, _ in events if e == "chunk" and started_at < t < ended_at]
    assert [t for t, e, _ in events if e == "chunk" and t > ended_at]

    # The lease went (free ->) inference -> (free ->) teleop -> (free ->) inference -> free at the end;
    # a free spell between two holders may be shorter than a tick, so it need not show.
    holders = _holders(states)
    assert [h for h in holders if h] == ["inference", "teleop", "inference"], holders
    assert holders[-1] == "", holders
    teleop_states = [m for m in states if m.get("lease_holder") == "teleop"]
    assert len(teleop_states) > 200  # about a second at 500 Hz
    q_teleop = np.stack([m["commanded"] for m in teleop_states])
    assert np.ptp(q_teleop[:, 0]) > 0.05  # teleop really moved the arm

    # No jump anywhere: each tick's commanded change is within the velocity limit times its time.
    t = np.array([m["mono_ns"] for m in states]) * 1e-9
    q = np.stack([m["commanded"] for m in states])
    dq = np.abs(np.diff(q, axis=0))
    bound = np.outer(np.diff(t), emb.max_velocity) * (1 + 1e-6) + 1e-9
    worst = int(np.argmax(np.max(dq / bound, axis=1)))
    assert np.all(dq <= bound), (worst, dq[worst], bound[worst], states[worst].get("lease_holder"))


def test_intervene_without_an_episode_and_resume_without_an_intervention_are_refused(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.start_all()
        client = EpisodeClient(procs.ctx, procs.cell)
        with pytest.raises(RemoteError) as err:
            client.ctl.request("intervene")
        assert err.value.code == ErrorCode.BAD_STATE and "no episode is running" in err.value.reason
        with pytest.raises(RemoteError) as err:
            client.ctl.request("resume")
        assert err.value.code == ErrorCode.BAD_STATE

        episode = client.start("wave", duration_s=3.0, arm=True)
        time.sleep(1.0)
        with pytest.raises(RemoteError) as err:
            client.ctl.request("resume")
        assert err.value.code == ErrorCode.BAD_STATE and "not intervened" in err.value.reason
        client.ctl.request("intervene")
        with pytest.raises(RemoteError) as err:
            client.ctl.request("intervene")
        assert err.value.code == ErrorCode.BAD_STATE and "already intervened" in err.value.reason
        # Left intervened: the episode still ends on time, reports it, and leaves the lease free.
        report = client.wait_report(episode, timeout_s=20)
        client.close()
    assert report["outcome"] == "completed", report
    assert report["interventions"] == 1 and 1.0 < report["intervened_s"] < 3.0, report
