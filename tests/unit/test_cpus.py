"""CPU placement: a driver's own CPUs, everything else of the cell kept off them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from armada.runtime.config import SCRIPTED_CELL, DriverConfig, load_cell
from armada.runtime.cpus import CpuPlacementError, cpus_for, reserved_cpus


def _cell(tmp_path: Path, cpus: list[int] | None) -> Path:
    data = yaml.safe_load(SCRIPTED_CELL.read_text())
    data["drivers"][0]["embodiment"] = str(SCRIPTED_CELL.parent.parent / "embodiments" / "mock_arm.yaml")
    if cpus is not None:
        data["drivers"][0]["cpus"] = cpus
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_without_cpus_nothing_is_placed(tmp_path):
    cell = load_cell(_cell(tmp_path, None))
    assert reserved_cpus(cell) == set()
    for role, name in (("driver", cell.drivers[0].name), ("camera", cell.cameras[0].name), ("infer", None)):
        assert cpus_for(cell, role, name, available={0, 1, 2, 3}) is None


def test_the_driver_gets_its_cpus_and_the_others_the_rest(tmp_path):
    cell = load_cell(_cell(tmp_path, [3]))
    arm = cell.drivers[0].name
    assert cpus_for(cell, "driver", arm, available={0, 1, 2, 3}) == {3}
    assert cpus_for(cell, "camera", cell.cameras[0].name, available={0, 1, 2, 3}) == {0, 1, 2}
    assert cpus_for(cell, "infer", None, available={0, 1, 2, 3}) == {0, 1, 2}


def test_a_cpu_this_process_may_not_use_is_refused_by_name(tmp_path):
    cell = load_cell(_cell(tmp_path, [7]))
    with pytest.raises(CpuPlacementError, match=r"cpus \[7\] include \[7\]"):
        cpus_for(cell, "driver", cell.drivers[0].name, available={0, 1})


def test_when_the_drivers_reserve_every_cpu_the_others_share_them(tmp_path):
    cell = load_cell(_cell(tmp_path, [0, 1]))
    assert cpus_for(cell, "infer", None, available={0, 1}) is None


@pytest.mark.parametrize("cpus", [[], [-1], [1, 1]])
def test_the_config_refuses_bad_cpu_lists(cpus):
    with pytest.raises(ValidationError, match="cpus"):
        DriverConfig(name="arm", embodiment="mock_arm", backend={"kind": "mock"}, state="ipc:///tmp/s",
                     cmd="ipc:///tmp/c", cpus=cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to place a process on one of them")
def test_armada_driver_refuses_a_cpu_it_cannot_have_before_it_starts(tmp_path):
    bad = max(os.sched_getaffinity(0)) + 64
    path = _cell(tmp_path, [bad])
    out = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "driver", str(path), "--run-dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"cpus [{bad}]" in out.stderr, out.stderr[-500:]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to place a process on one of them")
def test_a_cell_s_processes_run_where_the_placement_says(short_tmp):
    from armada.runtime.supervisor import CellProcesses

    mine = sorted(os.sched_getaffinity(0))
    path = _cell(short_tmp, [mine[-1]])
    with CellProcesses(path, short_tmp / "run") as procs:
        procs.spawn("driver", procs.cell.drivers[0].name)
        procs.spawn("camera", procs.cell.cameras[0].name)
        procs.wait_ready()
        placed = {c.role: set(os.sched_getaffinity(c.proc.pid)) for c in procs.children}
        # every thread of the driver, not only its main one (they inherit the placement)
        threads = [int(t) for t in os.listdir(f"/proc/{procs.children[0].proc.pid}/task")]
        assert all(set(os.sched_getaffinity(t)) == {mine[-1]} for t in threads)
    assert placed == {"driver": {mine[-1]}, "camera": set(mine[:-1])}
