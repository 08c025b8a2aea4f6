"""`armada systemd CELL`: the units of a cell, what they contain, and that systemd-analyze verify passes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from armada.runtime.cli import build_parser, main
from armada.runtime.config import REPO_ROOT, load_cell
from armada.runtime.deploy.systemd_units import Options, UnitError, render, write

CELLS = REPO_ROOT / "configs" / "cells"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")


def _units(cell_file: str, **opts):
    cell = load_cell(CELLS / cell_file, "/run/armada/x")
    return cell, render(cell, Options(cell_path=CELLS / cell_file, venv=Path(sys.prefix), **opts))


def _section(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (every occurrence, in order)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def _verify(folder: Path) -> subprocess.CompletedProcess:
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".service", ".target"))
    # SYSTEMD_UNIT_PATH: so the drop-ins next to the units are read and checked too.
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{folder}:")
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *names], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=60)


def test_every_process_of_the_cell_has_a_unit_under_one_target() -> None:
    cell, units = _units("cameras_fake.yaml")
    assert units.target == "armada-cameras_fake.target"
    expected = ["armada-cameras_fake-driver-arm.service", "armada-cameras_fake-camera-head.service",
                "armada-cameras_fake-camera-wrist.service", "armada-cameras_fake-camera-side.service",
                "armada-cameras_fake-infer.service"]
    assert units.services == expected
    target = _section(units.files[units.target])
    assert target["Wants"] == [" ".join(expected)]
    assert target["WantedBy"] == ["multi-user.target"]
    for name in expected:
        unit = _section(units.files[name])
        assert unit["PartOf"] == [units.target]
        assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
        assert float(unit["WatchdogSec"][0]) > 0
        assert unit["User"] == ["armada"]
        assert unit["RuntimeDirectory"] == ["armada/cameras_fake"] and unit["RuntimeDirectoryPreserve"] == ["yes"]
        assert unit["RuntimeDirectoryMode"] == ["0700"] and unit["StateDirectoryMode"] == ["0700"]
        for key, value in [("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                           ("NoNewPrivileges", "yes"), ("UMask", "0077")]:
            assert unit[key] == [value], (name, key)
        assert "PrivateDevices" not in unit  # drivers and cameras need /dev
    infer = _section(units.files["armada-cameras_fake-infer.service"])
    assert all(s in infer["After"][0] for s in expected[:-1])  # after drivers and cameras are READY
    driver = _section(units.files["armada-cameras_fake-driver-arm.service"])
    assert "ARMADA_STATE_DIR=%S/armada/cameras_fake" in driver["Environment"]
    assert set(driver["SupplementaryGroups"][0].split()) == {"dialout", "plugdev"}
    sysusers = units.files["sysusers.d/armada-armada.conf"]
    member_of = {line.split()[2] for line in sysusers.splitlines() if line.startswith("m ")}
    assert member_of >= {"dialout", "plugdev", "video"}
    # A SupplementaryGroups= group that does not exist fails the start: sysusers creates every one.
    for name in expected:
        assert set(_section(units.files[name])["SupplementaryGroups"][0].split()) <= member_of
    assert "RestrictRealtime" not in driver  # it would forbid the control loop's SCHED_FIFO


def test_exec_start_is_a_command_line_armada_accepts() -> None:
    _, units = _units("cameras_fake.yaml")
    for name in units.services:
        exec_start = _section(units.files[name])["ExecStart"][0].replace("%t", "/run")
        argv = shlex.split(exec_start)
        assert argv[0] == str(Path(sys.prefix) / "bin" / "armada")
        args = build_parser().parse_args(argv[1:])
        assert args.command in ("driver", "camera", "infer")
        assert Path(args.cell) == CELLS / "cameras_fake.yaml" and args.run_dir == Path("/run/armada/cameras_fake")


def test_a_realtime_driver_gets_its_limits_in_a_drop_in() -> None:
    cell, units = _units("ur3_fake.yaml")
    priority = cell.drivers[0].realtime_priority
    assert priority is not None
    dropin = _section(units.files["armada-ur3_fake-driver-arm.service.d/10-realtime.conf"])
    assert dropin["LimitRTPRIO"] == [str(priority)] and dropin["LimitMEMLOCK"] == ["infinity"]
    # The process sets each thread's priority itself: never the whole process from the unit.
    assert "CPUSchedulingPolicy" not in units.files["armada-ur3_fake-driver-arm.service"]
    _, plain = _units("cameras_fake.yaml")
    assert not [n for n in plain.files if n.endswith(".conf") and ".service.d/" in n]


def _with_cpus(tmp_path: Path, cpus: list[int]) -> Path:
    """ur3_fake.yaml with its driver keeping ``cpus`` (the cell's relative paths still resolve)."""
    import yaml

    data = yaml.safe_load((CELLS / "ur3_fake.yaml").read_text())
    data["drivers"][0]["cpus"] = cpus
    path = tmp_path / "ur3_cpus.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_driver_that_keeps_cpus_gets_cpu_affinity_in_a_drop_in(tmp_path: Path) -> None:
    path = _with_cpus(tmp_path, [1, 3])
    cell = load_cell(path, "/run/armada/x")
    units = render(cell, Options(cell_path=path, venv=Path(sys.prefix)))
    dropin = _section(units.files["armada-ur3_fake-driver-arm.service.d/20-cpus.conf"])
    assert dropin["CPUAffinity"] == ["1 3"]
    assert "isolcpus=1,3" in units.files["armada-ur3_fake-driver-arm.service.d/20-cpus.conf"]
    # Only the driver's unit: the others pin themselves off those CPUs at start (runtime/cpus.py).
    assert [n for n in units.files if n.endswith("20-cpus.conf")] == ["armada-ur3_fake-driver-arm.service.d/20-cpus.conf"]
    assert not any("CPUAffinity" in text for name, text in units.files.items() if not name.endswith("20-cpus.conf"))
    _, plain = _units("ur3_fake.yaml")
    assert not [n for n in plain.files if n.endswith("20-cpus.conf")]
    on_gpu_host = render(cell, Options(cell_path=path, venv=Path(sys.prefix), roles=("infer",)))
    assert not [n for n in on_gpu_host.files if n.endswith("20-cpus.conf")]
    if SYSTEMD_ANALYZE is not None:
        write(units, tmp_path / "units")
        result = _verify(tmp_path / "units")
        assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_venv_under_home_keeps_home_readable() -> None:
    cell = load_cell(CELLS / "scripted.yaml", "/run/armada/x")
    units = render(cell, Options(cell_path=Path("/home/lab/cells/scripted.yaml"), venv=Path("/home/lab/.venv")))
    assert "ProtectHome=read-only" in units.files["armada-scripted-driver-arm.service"]


def test_bad_names_and_paths_are_refused() -> None:
    cell = load_cell(CELLS / "scripted.yaml", "/run/armada/x")
    with pytest.raises(UnitError, match="user"):
        render(cell, Options(cell_path=CELLS / "scripted.yaml", user="ar mada"))
    with pytest.raises(UnitError, match="quotes"):
        render(cell, Options(cell_path=Path('/etc/armada/"cell".yaml')))
    with pytest.raises(UnitError, match="positive"):
        render(cell, Options(cell_path=CELLS / "scripted.yaml", driver_watchdog_s=0))
    # '%' and '$' would be specifiers and variables to systemd: escaped, quoted with a space.
    units = render(cell, Options(cell_path=Path("/etc/my cells/100%.yaml"), venv=Path(sys.prefix)))
    assert '"/etc/my cells/100%%.yaml"' in units.files["armada-scripted-infer.service"]


@needs_analyze
@pytest.mark.parametrize("cell_file", ["cameras_fake.yaml", "ur3_fake.yaml", "cobot_magic_fake.yaml"])
def test_systemd_analyze_verify_passes(tmp_path: Path, cell_file: str) -> None:
    _, units = _units(cell_file)
    write(units, tmp_path)
    result = _verify(tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr


@needs_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a unit with a bad value or a missing binary does not verify."""
    _, units = _units("ur3_fake.yaml")
    write(units, tmp_path)
    dropin = tmp_path / "armada-ur3_fake-driver-arm.service.d/10-realtime.conf"
    dropin.write_text(dropin.read_text() + "LimitRTPRIO=lots\n")
    assert "10-realtime.conf:7: Failed to parse" in _verify(tmp_path).stderr  # what the passing test forbids
    broken = render(load_cell(CELLS / "ur3_fake.yaml", "/run/armada/x"),
                    Options(cell_path=CELLS / "ur3_fake.yaml", venv=tmp_path / "no-venv"))
    write(broken, tmp_path / "b")
    assert _verify(tmp_path / "b").returncode != 0


def test_cli_writes_the_units_and_says_how_to_enable_them(tmp_path: Path, capsys) -> None:
    out = tmp_path / "units"
    assert main(["systemd", str(CELLS / "ur3_fake.yaml"), "--out", str(out), "--venv", sys.prefix,
                 "--user", "robot", "--cell-path", "/etc/armada/ur3.yaml"]) == 0
    printed = capsys.readouterr().out
    assert (out / "armada-ur3_fake.target").exists()
    assert (out / "armada-ur3_fake-driver-arm.service.d" / "10-realtime.conf").exists()
    assert (out / "sysusers.d" / "armada-robot.conf").read_text().startswith("#")
    driver = (out / "armada-ur3_fake-driver-arm.service").read_text()
    assert "User=robot" in driver and "/etc/armada/ur3.yaml" in driver
    assert "systemctl enable --now armada-ur3_fake.target" in printed
    assert "systemctl daemon-reload" in printed and "systemd-sysusers" in printed


def test_cli_bad_cell_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndrivers: []\n")
    assert main(["systemd", str(bad), "--out", str(tmp_path / "units")]) == 2
    assert "config error" in capsys.readouterr().err
    assert not (tmp_path / "units").exists()


def test_a_cell_split_over_hosts_writes_this_hosts_processes_with_its_keys(tmp_path: Path) -> None:
    cell = load_cell(CELLS / "scripted.yaml", "/run/armada/x")
    keys = tmp_path / "keys" / "gpu"
    gpu = render(cell, Options(cell_path=CELLS / "scripted.yaml", venv=Path(sys.prefix), roles=("infer",), keys=keys))
    assert gpu.services == ["armada-scripted-infer.service"]
    assert _section(gpu.files[gpu.target])["Wants"] == ["armada-scripted-infer.service"]
    assert f"ARMADA_KEYS={keys}" in _section(gpu.files["armada-scripted-infer.service"])["Environment"]
    robot = render(cell, Options(cell_path=CELLS / "scripted.yaml", venv=Path(sys.prefix), roles=("driver", "camera")))
    assert robot.services == ["armada-scripted-driver-arm.service", "armada-scripted-camera-front.service",
                              "armada-scripted-camera-wrist.service"]
    assert "ARMADA_KEYS" not in robot.files["armada-scripted-driver-arm.service"]
    with pytest.raises(UnitError, match="roles"):
        render(cell, Options(cell_path=CELLS / "scripted.yaml", roles=("gpu",)))
    if SYSTEMD_ANALYZE is not None:
        write(gpu, tmp_path / "gpu")
        result = _verify(tmp_path / "gpu")
        assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


TEMPLATES = REPO_ROOT / "systemd"


def test_the_shipped_templates_say_the_same_as_the_generated_units() -> None:
    for name in ("armada-driver@.service", "armada-camera@.service", "armada-infer.service"):
        unit = _section((TEMPLATES / name).read_text())
        assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"] and unit["WatchdogSec"], name
        assert unit["RuntimeDirectoryPreserve"] == ["yes"] and unit["StateDirectory"] == ["armada"], name
        for key, value in [("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes")]:
            assert unit[key] == [value], (name, key)
    driver = _section((TEMPLATES / "armada-driver@.service").read_text())
    assert "ARMADA_STATE_DIR=%S/armada" in driver["Environment"] and driver["LimitRTPRIO"]


@needs_analyze
def test_the_shipped_templates_verify(tmp_path: Path) -> None:
    for path in TEMPLATES.glob("*.service"):
        # Their ExecStart names the deployment's venv (/opt/armada/.venv); verify against ours.
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/armada/.venv", sys.prefix))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "armada-driver@arm.service", "armada-camera@front.service",
                             "armada-infer.service"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
