"""`armada doctor [CELL] [--json]`: can this cell run on this machine? One row per check, each
with what was found and a one-line fix.

Exit code: 0 the cell can run (warnings allowed), 1 a check failed, 2 the cell file is bad.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from armada.runtime.doctor.checks import (
    STATUSES,
    Check,
    DeviceNeed,
    backend_needs,
    camera_needs,
    check_bundle,
    check_calibration,
    check_can,
    check_clock,
    check_curve,
    check_cpu,
    check_measured_clocks,
    check_device_groups,
    check_device_node,
    check_onnxruntime,
    check_peer_clocks,
    check_realsense,
    check_realtime,
    check_remote_hosts,
    check_torch,
    check_ur_dashboard,
)
from armada.runtime.doctor.host import Host

EXIT_OK, EXIT_FAIL, EXIT_BAD_CELL = 0, 1, 2
# The groups that usually own these device nodes on Debian/Ubuntu (udev's defaults; RealSense's
# udev rules give plugdev).
_GROUP_OF_KIND = {"serial": "dialout", "video": "video", "realsense": "plugdev"}


def add_doctor_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check that a cell can run on this machine, with a fix for each problem")
    p.add_argument("cell", nargs="?", type=Path, default=None, help="cell YAML (default: the default cell)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="fill {run_dir} in the cell with this folder (to check a running fake's ptys)")


@dataclass
class Report:
    cell: str
    checks: list[Check] = field(default_factory=list)
    bad_cell: bool = False

    @property
    def exit_code(self) -> int:
        if self.bad_cell:
            return EXIT_BAD_CELL
        return EXIT_FAIL if any(c.status == "fail" for c in self.checks) else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        return {"cell": self.cell, "exit_code": self.exit_code, "can_run": self.exit_code == EXIT_OK,
                "counts": counts, "checks": [c.as_dict() for c in self.checks]}


def _runs_here(host: Host, endpoint: str) -> bool:
    """Whether the process that binds ``endpoint`` runs on this host (ipc: always)."""
    from armada.runtime.remote.clock import endpoint_host

    name = endpoint_host(endpoint)
    if name is None:
        return True
    address = host.resolve(name)
    return address is not None and host.is_local(address)


def diagnose(cell_path: Path | None, host: Host | None = None, run_dir: Path | None = None) -> Report:
    """Every check for one cell; ``host`` is the machine as the checks see it (tests pass a fake)."""
    from armada.runtime.config import DEFAULT_CELL, ConfigError, load_cell, resolve_cell_file

    host = host or Host()
    path = Path(cell_path) if cell_path is not None else DEFAULT_CELL
    report = Report(str(path))
    try:
        cell = load_cell(path, run_dir=run_dir)
    except (ConfigError, OSError) as exc:
        report.bad_cell = True
        report.checks.append(Check("config", "fail", str(exc), "fix the key it names in the cell file"))
        return report
    except Exception as exc:  # noqa: BLE001 (a plugin's check raising its own error is still a bad cell)
        report.bad_cell = True
        report.checks.append(Check("config", "fail", f"{type(exc).__name__}: {exc}", "fix the cell file"))
        return report
    report.checks.append(Check("config", "ok", f"{cell.name}: {len(cell.drivers)} drivers, "
                               f"{len(cell.cameras)} cameras, policy {getattr(cell.inference.policy, 'kind', '?')}"))

    from armada.drivers.core.registry import BACKENDS

    needs: list[DeviceNeed] = []
    for drv in cell.drivers:
        needs += backend_needs(drv.name, drv.backend, BACKENDS.get(drv.backend.kind))
    for cam in cell.cameras:
        needs += camera_needs(cam)
    report.checks += device_checks(host, needs)

    report.checks.append(check_device_groups(host, {_GROUP_OF_KIND[n.kind] for n in needs
                                                     if n.kind in _GROUP_OF_KIND and "{run_dir}" not in n.target}))
    priorities = {d.name: d.realtime_priority for d in cell.drivers if d.realtime_priority is not None}
    report.checks += check_realtime(host, priorities)
    report.checks += check_cpu(host, realtime=bool(priorities),
                               driver_cpus={d.name: d.cpus for d in cell.drivers if d.cpus and _runs_here(host, d.cmd)})
    report.checks += check_curve(cell.curve)
    peers: dict[str, str] = {}
    report.checks += check_remote_hosts(host, cell_endpoints(cell), peers=peers)
    report.checks.append(check_clock(host, multi_host=bool(peers)))
    report.checks += check_peer_clocks(host, peers)
    report.checks += check_measured_clocks(host, cell, peers)

    for cam in cell.cameras:
        for key in ("intrinsics", "hand_eye", "latency"):
            name = getattr(cam, key, None)
            if name is not None:
                report.checks.append(check_calibration(host, f"{cam.name}.{key}", resolve_cell_file(path, name)))
    for drv in cell.drivers:
        if drv.joint_calibration is not None:
            report.checks.append(check_calibration(host, f"{drv.name}.joint_calibration",
                                                   resolve_cell_file(path, drv.joint_calibration)))

    report.checks += model_checks(host, cell.inference.policy, path.parent)
    return report


def cell_endpoints(cell: Any) -> list[tuple[str, str]]:
    """Every endpoint of the cell with the key that names it."""
    out = [(f"{d.name}.{k}", getattr(d, k)) for d in cell.drivers for k in ("state", "cmd")]
    out += [(f"{c.name}.frames", c.frames) for c in cell.cameras]
    out += [(f"{c.name}.clock", c.clock) for c in cell.cameras if c.clock]
    return out + [("inference.ctl", cell.inference.ctl), ("inference.events", cell.inference.events)]


def model_checks(host: Host, policy: Any, folder: Path) -> list[Check]:
    """The model's runtime, only for a policy that loads one (a ``bundle``); onnxruntime or torch is
    imported only here."""
    bundle = getattr(policy, "bundle", None)
    if not isinstance(bundle, str):
        return [Check("model", "skip", f"policy {getattr(policy, 'kind', '?')} loads no model")]
    rows = [check_bundle(bundle, folder)]
    onnx_dir = getattr(policy, "onnx_dir", None)
    if onnx_dir:
        onnx_path = Path(onnx_dir).expanduser()
        rows += check_onnxruntime(host, onnx_path if onnx_path.is_absolute() else folder / onnx_path)
    else:
        rows.append(check_torch())
    return rows


def device_checks(host: Host, needs: list[DeviceNeed]) -> list[Check]:
    rows: list[Check] = []
    for need in needs:
        if need.kind in ("serial", "video"):
            rows += check_device_node(host, need)
        elif need.kind == "can":
            rows.append(check_can(host, need))
        elif need.kind == "ur_dashboard":
            rows.append(check_ur_dashboard(host, need))
        elif need.kind == "realsense":
            rows.append(check_realsense(need))
    if not needs:
        rows.append(Check("devices", "skip", "the cell names no real device (mocks, simulators, fakes)"))
    return rows


def format_table(report: Report) -> str:
    width = max([len(c.name) for c in report.checks] + [5])
    lines = [f"armada doctor: {report.cell}", f"{'check':<{width}}  {'status':<6}  found / fix"]
    for c in report.checks:
        lines.append(f"{c.name:<{width}}  {c.status.upper():<6}  {c.found}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"{'':<{width}}  {'':<6}  fix: {c.fix}")
        elif c.fix and c.status == "skip":
            lines.append(f"{'':<{width}}  {'':<6}  hint: {c.fix}")
    counts = report.as_dict()["counts"]
    verdict = {EXIT_OK: "the cell can run here", EXIT_FAIL: "the cell cannot run here: fix the FAIL rows",
               EXIT_BAD_CELL: "the cell file is bad"}[report.exit_code]
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f": {verdict}")
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace, host: Host | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    report = diagnose(args.cell, host, getattr(args, "run_dir", None))
    if getattr(args, "json", False):
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        out.write(format_table(report) + "\n")
    return report.exit_code
