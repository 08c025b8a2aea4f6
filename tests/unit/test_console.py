"""The operator console's key handling, without processes: a fake terminal and a fake episode client."""

from __future__ import annotations

import pytest

from armada.runtime import console as console_mod
from armada.runtime.config import load_cell
from armada.runtime.console import DriverView, OperatorConsole, parse_keys
from armada.runtime.operator_commands import DriverAnswer
from armada.runtime.transport import RemoteError


class FakeKeys:
    def __init__(self, interactive: bool = True):
        self.interactive = interactive
        self.pending: list[str] = []
        self.reads = 0

    def read(self, timeout_s: float) -> list[str]:
        self.reads += 1
        keys, self.pending = self.pending, []
        return keys


class FakeClient:
    def __init__(self, refuse: str | None = None):
        self.calls: list[str] = []
        self.refuse = refuse

    def _call(self, kind: str) -> None:
        self.calls.append(kind)
        if kind == self.refuse:
            raise RemoteError("bad_state", f"{kind} refused for the test", kind)

    def intervene(self) -> int:
        self._call("intervene")
        return 1

    def resume(self) -> float:
        self._call("resume")
        return 0.5

    def stop(self, reason: str = "operator") -> None:
        self._call("stop")


@pytest.fixture
def cell(short_tmp):
    return load_cell(None, short_tmp)


def make(cell, keys: FakeKeys, client: FakeClient) -> tuple[OperatorConsole, list[str]]:
    lines: list[str] = []
    return OperatorConsole(cell, ctx=None, client=client, keys=keys, say=lines.append, watch=False), lines


def test_parse_keys_maps_the_console_letters_and_ignores_the_rest():
    assert parse_keys(b"pP") == ["pause", "pause"]
    assert parse_keys(b"serxnq") == ["stop", "estop", "reset", "next"]
    assert parse_keys(b"\x1b[A") == []  # an arrow key's letters are not commands
    assert parse_keys(b"\xff") == []


def test_pause_then_resume_goes_through_intervene_and_resume(cell):
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    keys.pending = ["pause"]
    assert con.poll(running=True) == ["pause"]
    assert con.paused and client.calls == ["intervene"]
    assert "PAUSED" in con.status()
    keys.pending = ["pause"]
    con.poll(running=True)
    assert not con.paused and client.calls == ["intervene", "resume"]
    assert any("resumed" in line for line in lines)


def test_a_refused_pause_changes_nothing_and_says_why(cell):
    keys, client = FakeKeys(), FakeClient(refuse="intervene")
    con, lines = make(cell, keys, client)
    keys.pending = ["pause"]
    con.poll(running=True)
    assert not con.paused
    assert "pause refused: intervene refused for the test" in lines[-1]


def test_pause_without_an_episode_sends_nothing(cell):
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    keys.pending = ["pause"]
    con.poll(running=False)
    assert client.calls == [] and "nothing to pause" in lines[-1]


def test_stop_ends_the_episode_and_the_run_next_only_the_episode(cell):
    keys, client = FakeKeys(), FakeClient()
    con, _ = make(cell, keys, client)
    keys.pending = ["next"]
    con.poll(running=True)
    assert client.calls == ["stop"] and not con.end_run and "next episode" in con.operator_stop
    con.new_episode()
    assert con.operator_stop is None
    keys.pending = ["stop"]
    con.poll(running=True)
    assert client.calls == ["stop", "stop"] and con.end_run


def test_estop_presses_every_driver_and_latches_the_console(cell, monkeypatch):
    pressed: list[str] = []

    def fake_estop(c, name=None, reason="operator"):
        pressed.append(reason)
        return [DriverAnswer(d.name, True, "estop") for d in c.drivers]

    monkeypatch.setattr(console_mod.operator, "estop", fake_estop)
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    keys.pending = ["estop"]
    con.poll(running=True)
    assert pressed == ["operator console (e)"] and con.estopped
    assert "e-stop" in con.operator_stop and "E-STOP latched" in con.status()
    assert client.calls == ["stop"]  # also ended: a paused episode sends no chunk that the driver could refuse


def test_an_unconfirmed_estop_says_to_use_the_hardware_one(cell, monkeypatch):
    monkeypatch.setattr(console_mod.operator, "estop",
                        lambda c, name=None, reason="": [DriverAnswer(d.name, False, detail="timed out") for d in c.drivers])
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    keys.pending = ["estop"]
    con.poll(running=True)
    assert "NOT CONFIRMED" in "\n".join(lines) and "hardware e-stop" in lines[-1]


def test_wait_after_estop_starts_nothing_until_n(cell, monkeypatch):
    monkeypatch.setattr(console_mod, "_mode", lambda c, name: "estop")
    monkeypatch.setattr(console_mod.operator, "reset_estop", lambda c, name: DriverAnswer(name, True, "idle"))
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    con.estopped = True
    script = iter([[], ["reset"], [], ["next"]])
    keys.read = lambda timeout_s: next(script)
    assert con.wait_after_estop() is True
    assert not con.estopped and any("stays disarmed" in line for line in lines)
    script = iter([["stop"]])
    assert con.wait_after_estop() is False and con.end_run


def test_not_a_terminal_reads_no_keys(cell):
    keys, client = FakeKeys(interactive=False), FakeClient()
    con, _ = make(cell, keys, client)
    keys.pending = ["estop"]
    assert con.poll(running=True) == [] and keys.reads == 0 and client.calls == []


def test_driver_view_text():
    assert DriverView("arm").text() == "arm ..."
    assert DriverView("arm", asked=True).text() == "arm no answer"
    assert DriverView("arm", "running", 498.6, 3, answered=True, asked=True).text() == "arm running 499 Hz clamps 3"


def test_driver_watch_turns_stats_into_mode_rate_and_clamps(monkeypatch):
    clock = iter([10.0, 10.5])
    monkeypatch.setattr(console_mod.time, "monotonic", lambda: next(clock))

    class Stats:
        def __init__(self):
            self.ticks = iter([1000, 1250])

        def request(self, kind: str) -> dict:
            assert kind == "stats"
            return {"mode": "running", "counters": {"ticks": next(self.ticks)},
                    "clamps": {"velocity": 2, "position": 1}}

    class Silent:
        def request(self, kind: str) -> dict:
            raise TimeoutError("no reply within 0.5 s")

    last: dict = {}
    client = Stats()
    first = console_mod.DriverWatch._ask("arm", client, last)
    assert first.text() == "arm running clamps 3"  # no rate from one sample
    second = console_mod.DriverWatch._ask("arm", client, last)
    assert second.rate_hz == pytest.approx(500.0) and second.clamps == 3
    assert console_mod.DriverWatch._ask("arm", Silent(), last).text() == "arm no answer" and "arm" not in last


def test_stop_between_episodes_ends_the_run_and_sends_nothing(cell):
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    keys.pending = ["next", "stop"]
    con.poll(running=False)
    assert con.end_run and client.calls == [] and lines == ["console: no more episodes"]


def test_wait_after_estop_ends_when_the_cell_breaks(cell):
    keys, client = FakeKeys(), FakeClient()
    con, lines = make(cell, keys, client)
    looks = iter(["", "", "driver arm exited with code 1"])
    assert con.wait_after_estop(lambda: next(looks)) is False
    assert con.end_run and lines[-1] == "console: driver arm exited with code 1: no more episodes"
