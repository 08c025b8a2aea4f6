"""`armada ...` as an operator runs it: real processes, exit codes, what it prints."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from armada.runtime.config import CONFIG_DIR, DEFAULT_CELL, REPO_ROOT

pytestmark = pytest.mark.hil

BIMANUAL = CONFIG_DIR / "cells" / "bimanual.yaml"


def _armada(*args: str, timeout_s: float = 90.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "armada.runtime.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def _json_reports(stdout: str) -> list[dict]:
    """The JSON report list that `--json` prints after the human-readable progress and reports."""
    start = stdout.find("\n[")
    assert start >= 0 or stdout.startswith("["), f"no JSON list in stdout:\n{stdout}"
    reports, _ = json.JSONDecoder().raw_decode(stdout[start + 1 if start >= 0 else 0:])
    return reports


def test_run_default_cell_completes_and_prints_a_report(short_tmp):
    result = _armada("run", "--duration", "2", "--run-dir", str(short_tmp))
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    out = result.stdout
    for needle in ("completed", "control rate", "chunk latency", "starved ticks"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    assert (short_tmp / "logs").is_dir()


def test_run_bimanual_cell_json_report(short_tmp):
    result = _armada("run", str(BIMANUAL), "--duration", "2", "--run-dir", str(short_tmp), "--json")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    reports = _json_reports(result.stdout)
    assert isinstance(reports, list) and len(reports) == 1
    report = reports[0]
    assert report["outcome"] == "completed"
    assert set(report["control_rate_hz"]) == {"robot"}
    assert 45.0 <= report["control_rate_hz"]["robot"] <= 52.0  # mock_bimanual is a 50 Hz embodiment
    assert report["chunks"] >= 1
    assert report["duration_s"] == pytest.approx(2.0, abs=0.5)


@pytest.mark.parametrize("old, new, key", [
    ("    lease_ttl_s: 0.3", "    lease_tll_s: 0.3", "drivers.0.lease_tll_s"),
    ("cameras:", "camras:", "camras"),
    ("  episode_duration_s: 6", "  episode_duration: 6", "inference.episode_duration"),
], ids=["driver-key", "top-level-key", "inference-key"])
def test_run_refuses_a_cell_with_a_typo_naming_file_and_key(tmp_path, short_tmp, old, new, key):
    text = DEFAULT_CELL.read_text()
    assert old in text
    cell = tmp_path / "typo.yaml"
    cell.write_text(text.replace(old, new, 1))  # embodiment stays `mock_arm`, a name, not a path
    t0 = time.monotonic()
    result = _armada("run", str(cell), "--duration", "1", "--run-dir", str(short_tmp), timeout_s=30)
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert str(cell) in result.stderr
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - t0 < 15  # refused before starting anything
    assert not (short_tmp / "logs").exists()


@pytest.mark.parametrize("role, available", [("driver", "arm"), ("camera", "front")])
def test_process_with_an_unknown_name_exits_with_the_available_names(short_tmp, role, available):
    t0 = time.monotonic()
    result = _armada(role, str(DEFAULT_CELL), "--name", "no_such_thing", "--run-dir", str(short_tmp),
                     timeout_s=30)
    assert result.returncode != 0
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in result.stderr, result.stderr
    assert "no_such_thing" in result.stderr
    assert available in result.stderr


def test_run_on_a_real_cell_names_the_arm_flag_and_arms_nothing(short_tmp, ur_fake):
    from tests.hil.test_ur3_driver import ur3_cell

    cell = ur3_cell(short_tmp, ur_fake.host, duration_s=2.0)
    result = _armada("run", str(cell), "--duration", "2", "--run-dir", str(short_tmp), timeout_s=60)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "--arm" in result.stderr and "arm=true" not in out, out  # the flag the operator types
    assert "driver arm is idle" in result.stderr
    assert "Traceback" not in out
