"""Which processes of a split cell run on this host (runtime/remote/hosts.py), and what `armada run`
says when another host's process does not answer. No process is started here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from armada.runtime.config import SCRIPTED_CELL, load_cell
from armada.runtime.remote.bench import loopback_aliases
from armada.runtime.remote.hosts import HostSplitError, ThisHost, can_bind, placements
from armada.runtime.supervisor import CellProcesses

ROBOT, GPU = "127.0.0.2", "127.0.0.3"


def _cell(folder: Path, driver_host: str | None, infer_host: str | None, camera_host: str | None = None) -> Path:
    """The scripted cell with its driver, first camera and inference on these hosts (None: ipc)."""
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    port = iter(range(47000, 47100))

    def ep(host: str | None, name: str) -> str:
        return f"tcp://{host}:{next(port)}" if host else f"ipc://{{run_dir}}/{name}"

    drv = data["drivers"][0]
    drv["state"], drv["cmd"] = ep(driver_host, "arm-state"), ep(driver_host, "arm-cmd")
    data["cameras"] = [dict(data["cameras"][0], frames=ep(camera_host, "cam-front"))]
    data["inference"]["ctl"], data["inference"]["events"] = ep(infer_host, "ctl"), ep(infer_host, "events")
    data["plain_tcp_loopback"] = True  # loopback only: the test stands in for two hosts
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _where(cell_path: Path, run_dir: Path, here: ThisHost) -> dict[str, bool]:
    return {p.title: p.local for p in placements(load_cell(cell_path, run_dir), here)}


def test_an_all_ipc_cell_runs_here_whatever_this_host_is(short_tmp):
    cell = _cell(short_tmp, None, None)
    assert set(_where(cell, short_tmp, ThisHost.of(None)).values()) == {True}
    assert set(_where(cell, short_tmp, ThisHost.of([GPU])).values()) == {True}


def test_this_host_picks_the_processes_that_bind_on_its_address(short_tmp):
    cell = _cell(short_tmp, ROBOT, GPU, camera_host=ROBOT)
    assert _where(cell, short_tmp, ThisHost.of([GPU])) == {"driver arm": False, "camera front": False,
                                                          "inference": True}
    assert _where(cell, short_tmp, ThisHost.of([ROBOT])) == {"driver arm": True, "camera front": True,
                                                            "inference": False}
    # Without --this-host, the addresses this machine can bind: loopback is all of them here.
    assert set(_where(cell, short_tmp, ThisHost.of(None)).values()) == {True}


def test_can_bind_knows_loopback_from_a_foreign_address():
    assert can_bind("127.0.0.1") and can_bind("localhost") and can_bind("*")
    assert not can_bind("192.0.2.1")  # TEST-NET-1: nobody's address


def test_a_process_whose_endpoints_name_two_hosts_is_refused(short_tmp):
    cell = _cell(short_tmp, ROBOT, GPU)
    data = yaml.safe_load(cell.read_text())
    data["drivers"][0]["cmd"] = f"tcp://{GPU}:47555"
    cell.write_text(yaml.safe_dump(data))
    with pytest.raises(HostSplitError, match=r"driver arm binds on two hosts: cmd=tcp://127.0.0.3:47555 on this one, "
                                             r"state=tcp://127.0.0.2:\d+ elsewhere"):
        placements(load_cell(cell, short_tmp), ThisHost.of([GPU]))


def test_a_wildcard_is_not_an_address_of_this_host():
    with pytest.raises(HostSplitError, match="not a wildcard"):
        ThisHost.of(["0.0.0.0"])


def test_waiting_for_another_hosts_process_names_it_its_host_and_how_to_start_it(short_tmp):
    cell = _cell(short_tmp / "c", ROBOT, None, camera_host=ROBOT)
    run_dir = short_tmp / "run"
    with CellProcesses(cell, run_dir, this_host=(GPU,)) as procs:
        assert [p.title for p in procs.remote] == ["driver arm", "camera front"]
        t = time.monotonic()
        with pytest.raises(TimeoutError) as err:
            procs.wait_remote(0.5)
        assert time.monotonic() - t < 5  # bounded: each try has its own short timeout
    text = str(err.value)
    assert "2 process(es) of other hosts did not answer within 0.5 s" in text
    assert f"driver arm on {ROBOT} (tcp://{ROBOT}:" in text and f"`armada driver {cell} --name arm`" in text
    assert f"camera front on {ROBOT}" in text and f"`armada camera {cell} --name front`" in text


def test_armada_run_refuses_a_process_split_over_two_hosts_before_starting_anything(short_tmp, capsys):
    from armada.runtime import cli

    cell = _cell(short_tmp / "c", ROBOT, GPU)
    data = yaml.safe_load(cell.read_text())
    data["drivers"][0]["cmd"] = f"tcp://{GPU}:47555"
    cell.write_text(yaml.safe_dump(data))
    run_dir = short_tmp / "run"
    assert cli.main(["run", str(cell), "--run-dir", str(run_dir), "--this-host", GPU]) == 2
    assert "binds on two hosts" in capsys.readouterr().err
    assert not (run_dir / "logs").exists()  # nothing started, nothing created


pytestmark = pytest.mark.skipif(not loopback_aliases(), reason="this machine cannot bind 127.0.0.2/127.0.0.3")
