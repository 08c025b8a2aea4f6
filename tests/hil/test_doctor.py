"""`armada doctor` against a running fake UR controller (its own process on a loopback address):
the dashboard answers, the controller reports remote control, and the doctor moves nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from armada.drivers.ur3.fake.launch import FakeStartError, FakeUR, free_loopback_host

pytestmark = pytest.mark.hil
REPO = Path(__file__).resolve().parents[2]


def _ur_cell(tmp_path: Path, host: str) -> Path:
    cell = yaml.safe_load((REPO / "configs/cells/ur3_fake.yaml").read_text())
    cell["drivers"][0]["backend"]["host"] = host
    path = tmp_path / "ur3_doctor.yaml"
    path.write_text(yaml.safe_dump(cell))
    return path


def _doctor(cell: Path, *extra: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "doctor", str(cell), "--json", *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_doctor_against_fake_ur(tmp_path):
    try:
        fake = FakeUR.start_anywhere()
    except FakeStartError as exc:
        pytest.skip(f"cannot bind a loopback address for the fake UR: {exc}")
    with fake:
        before = fake.state()
        code, report = _doctor(_ur_cell(tmp_path, fake.host))
        after = fake.state()
    rows = {c["name"]: c for c in report["checks"]}
    assert rows["ur arm.host"]["status"] == "ok", rows["ur arm.host"]
    assert "in remote control" in rows["ur arm.host"]["found"]
    assert code == 0 and report["can_run"] is True
    # Only a dashboard query went out: no program started, the joints did not move.
    assert after["q"] == before["q"]
    assert after["program_running"] is False
    assert after["program_starts"] == before["program_starts"] and after["script_bytes"] == before["script_bytes"]


def test_doctor_with_no_controller_fails_fast(tmp_path):
    host = free_loopback_host()
    if host is None:
        pytest.skip("no free loopback address")
    code, report = _doctor(_ur_cell(tmp_path, host))
    rows = {c["name"]: c for c in report["checks"]}
    assert code == 1 and rows["ur arm.host"]["status"] == "fail" and rows["ur arm.host"]["fix"]


def test_doctor_finds_a_running_fake_so101s_ptys(short_tmp):
    """--run-dir fills {run_dir}: the fake's pty symlinks are then checked like real serial ports."""
    from armada.drivers.so101.fake.so101 import So101FakeProcess

    cell = yaml.safe_load((REPO / "configs/cells/so101_fake.yaml").read_text())
    for name in ("so101_fake_follower.json", "so101_fake_leader.json"):
        shutil.copy(REPO / "configs/cells" / name, short_tmp / name)
    path = short_tmp / "cell.yaml"
    path.write_text(yaml.safe_dump(cell))
    code, report = _doctor(path, "--run-dir", str(short_tmp))
    rows = {c["name"]: c for c in report["checks"]}
    assert code == 1 and rows["serial robot.port"]["status"] == "fail"  # no fake yet: missing
    with So101FakeProcess(short_tmp):
        code, report = _doctor(path, "--run-dir", str(short_tmp))
    rows = {c["name"]: c for c in report["checks"]}
    assert rows["serial robot.port"]["status"] == "ok", rows["serial robot.port"]
    assert rows["serial robot.leader_port"]["status"] == "ok"
    assert code == 0
