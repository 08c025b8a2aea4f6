"""`armada systemd CELL --out DIR`: the systemd units of one cell, and how to enable them.

One service per process of the cell (each driver, each camera, the inference process), all
``Type=notify`` with a watchdog fed from the process's own loop (drivers/core/notify.py), grouped
under ``armada-CELL.target``; a drop-in per real-time driver with the kernel limits it needs; a
sysusers.d file for the dedicated user and its device groups. Nothing is installed: the command
writes files and prints the commands to install them.

Where things live (system units; ``%t`` is /run, ``%S`` is /var/lib):

- run dir ``%t/armada/CELL``: sockets and instance locks. A ``RuntimeDirectory=`` shared by every
  unit of the cell with ``RuntimeDirectoryPreserve=yes``: without it, stopping one unit would delete
  the folder under the others' sockets. It goes away at reboot, which is what a run dir is for.
- state dir ``%S/armada/CELL``: the drivers' e-stop latches (``ARMADA_STATE_DIR``), which must
  survive a restart and a reboot: a latched e-stop is only ever cleared by ``armada reset-estop``.

Hardening that leaves a robot working: ``ProtectSystem=strict`` (the whole file system read-only
but the run and state dirs), ``PrivateTmp=``, ``NoNewPrivileges=``, ``ProtectHome=`` (read-only
when the venv or cell lives under /home), kernel tunables/modules/cgroups protected. Not
``PrivateDevices=``: drivers need /dev/ttyUSB*, cameras /dev/video* and USB, inference the GPU.
Real-time: a driver with ``realtime_priority`` gets ``LimitRTPRIO=`` and ``LimitMEMLOCK=`` in a
drop-in and sets each thread's priority itself (loop above command thread above the rest), so the
unit does not set ``CPUSchedulingPolicy=`` for the whole process. A driver with ``cpus:`` gets
``CPUAffinity=`` in a drop-in, so systemd starts it there.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from armada.runtime.config import CellConfig, load_cell

DEFAULT_USER = "armada"
# Seconds of silence from a process's loop before systemd kills and restarts it. A driver ticks at
# tens to hundreds of Hz: two seconds is a loop that is stuck, not a slow tick. A camera's loop
# passes every read slice (0.2 s) and every reopen try; inference's ctl loop every 50 ms poll.
DRIVER_WATCHDOG_S = 2.0
CAMERA_WATCHDOG_S = 10.0
INFERENCE_WATCHDOG_S = 30.0
# Groups of the dedicated user: serial adapters and CAN-USB (dialout), USB devices such as
# RealSense through udev rules (plugdev), V4L2 cameras and the GPU's render nodes (video, render).
DEVICE_GROUPS = ("dialout", "plugdev", "video", "render")
ROLES = ("driver", "camera", "infer")
ROLE_GROUPS = {"driver": ("dialout", "plugdev"), "camera": ("video", "plugdev"), "infer": ("video", "render")}
# systemd unit names allow more, but these names also become file names and ExecStart arguments.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class UnitError(ValueError):
    """The cell or an option cannot make valid units (the message says which and why)."""


@dataclass(frozen=True)
class Options:
    cell_path: Path  # absolute: what ExecStart passes to armada
    user: str = DEFAULT_USER
    venv: Path = Path(sys.prefix)
    driver_watchdog_s: float = DRIVER_WATCHDOG_S
    # This host's CURVE key set (`armada keys`), passed as ARMADA_KEYS (runtime/remote/hostkeys.py).
    keys: Path | None = None
    # Which processes run on this host: a cell split over hosts writes the drivers and cameras on
    # the robot PC and the inference process on the GPU host.
    roles: tuple[str, ...] = ROLES


@dataclass
class UnitSet:
    """File name (relative to the output folder) -> contents."""

    target: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> list[str]:
        return [name for name in self.files if name.endswith(".service")]


def _checked(what: str, name: str) -> str:
    if not _SAFE_NAME.match(name):
        raise UnitError(f"{what} {name!r} cannot name a systemd unit: use letters, digits, '_', '.', '-'")
    return name


def _arg(value: str | Path) -> str:
    """One ExecStart argument: '%' and '$' escaped (specifiers, variables), quoted when it has spaces."""
    text = str(value)
    if any(c in text for c in "\n\r\"\\'"):
        raise UnitError(f"{text!r}: a path with quotes, backslashes or newlines cannot go into a unit file")
    text = text.replace("%", "%%").replace("$", "$$")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _under_home(*paths: Path) -> bool:
    return any(p.is_relative_to("/home") or p.is_relative_to("/root") for p in paths)


def render(cell: CellConfig, opts: Options) -> UnitSet:
    """Every unit and drop-in of ``cell`` (pure: nothing is written)."""
    cell_name = _checked("cell name", cell.name)
    _checked("user", opts.user)
    if opts.driver_watchdog_s <= 0:
        raise UnitError(f"--driver-watchdog-s must be positive, got {opts.driver_watchdog_s}")
    armada = opts.venv / "bin" / "armada"
    prefix = f"armada-{cell_name}"
    target = f"{prefix}.target"
    run_dir = f"%t/armada/{cell_name}"
    common_args = f"{_arg(opts.cell_path)}"
    home = "read-only" if _under_home(opts.venv, opts.cell_path, *([opts.keys] if opts.keys else [])) else "yes"
    unknown = set(opts.roles) - set(ROLES)
    if unknown or not opts.roles:
        raise UnitError(f"roles {sorted(unknown) or '(none)'}: choose among {', '.join(ROLES)}")
    keys_env = [f"Environment=ARMADA_KEYS={_arg(opts.keys)}"] if opts.keys is not None else []
    units = UnitSet(target)

    def service(role: str, name: str | None, description: str, exec_args: str, watchdog_s: float,
                extra: list[str], after: list[str] = ()) -> str:
        unit = f"{prefix}-{role}-{name}.service" if name else f"{prefix}-{role}.service"
        lines = [
            "# Written by `armada systemd`; regenerate rather than edit, put local changes in a drop-in.",
            "[Unit]",
            f"Description={description}",
            f"PartOf={target}",
            "After=network-online.target" + "".join(f" {a}" for a in after),
            "Wants=network-online.target",
            # A process that keeps dying (device unplugged) stops being restarted after 5 tries a minute.
            "StartLimitIntervalSec=60",
            "StartLimitBurst=5",
            "",
            "[Service]",
            # READY=1 once serving, WATCHDOG=1 from its own loop, STATUS, STOPPING=1 (drivers/core/notify.py).
            "Type=notify",
            "NotifyAccess=main",
            f"WatchdogSec={watchdog_s:g}",
            f"User={opts.user}",
            f"Group={opts.user}",
            "SupplementaryGroups=" + " ".join(ROLE_GROUPS[role]),
            # Shared by the cell's units and kept when one stops: its sockets and locks are the others' too.
            f"RuntimeDirectory=armada/{cell_name}",
            "RuntimeDirectoryMode=0700",
            "RuntimeDirectoryPreserve=yes",
            f"StateDirectory=armada/{cell_name}",
            "StateDirectoryMode=0700",
            "UMask=0077",
            "Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
            *keys_env,
            f"ExecStart={_arg(armada)} {exec_args} --run-dir {run_dir}",
            "Restart=on-failure",
            "RestartSec=2",
            *extra,
            "ProtectSystem=strict",
            f"ProtectHome={home}",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
            "RestrictSUIDSGID=yes",
            "LockPersonality=yes",
            # Deliberately not: PrivateDevices= (the devices), RestrictRealtime= (the control loop's
            # SCHED_FIFO), MemoryDenyWriteExecute= (JIT in ONNX Runtime and NumPy's dependencies).
            "",
        ]
        if role in opts.roles:
            units.files[unit] = "\n".join(lines)
        return unit

    drivers, cameras = [], []
    for d in cell.drivers:
        name = _checked("driver name", d.name)
        unit = service("driver", name, f"armada {cell_name}: driver {name}",
                       f"driver {common_args} --name {name}", opts.driver_watchdog_s,
                       [f"Environment=ARMADA_STATE_DIR=%S/armada/{cell_name}",
                        # SIGTERM: hold position and close the device; torque is never cut.
                        "KillSignal=SIGTERM",
                        "TimeoutStartSec=30",
                        "TimeoutStopSec=5"])
        drivers.append(unit)
        if d.realtime_priority is not None and "driver" in opts.roles:
            units.files[f"{unit}.d/10-realtime.conf"] = "\n".join([
                f"# Driver {name} asks for SCHED_FIFO priority {d.realtime_priority} (realtime_priority in the cell):",
                "# the process sets each thread's priority itself within these limits. Delete this drop-in",
                "# to run without real-time scheduling (more jitter, counted as overruns).",
                "[Service]",
                f"LimitRTPRIO={d.realtime_priority}",
                "LimitMEMLOCK=infinity",
                "",
            ])
        if d.cpus and "driver" in opts.roles:
            cpu_list = " ".join(map(str, d.cpus))
            units.files[f"{unit}.d/20-cpus.conf"] = "\n".join([
                f"# Driver {name} keeps CPU {cpu_list} for its control loop (cpus: in the cell); the process pins",
                "# itself there too, and the cell's other processes stay off. Other services and kernel threads",
                f"# still run there unless the kernel command line says isolcpus={','.join(map(str, d.cpus))}.",
                "[Service]",
                f"CPUAffinity={cpu_list}",
                "",
            ])
    for c in cell.cameras:
        name = _checked("camera name", c.name)
        cameras.append(service("camera", name, f"armada {cell_name}: camera {name}",
                               f"camera {common_args} --name {name}", CAMERA_WATCHDOG_S,
                               ["TimeoutStartSec=60", "TimeoutStopSec=5"]))
    # After the drivers and cameras are READY: its first observation needs them.
    infer = service("infer", None, f"armada {cell_name}: inference", f"infer {common_args}", INFERENCE_WATCHDOG_S,
                    [f"CacheDirectory=armada/{cell_name}",
                     f"Environment=XDG_CACHE_HOME=%C/armada/{cell_name}",
                     # Loading a model takes a while; READY comes once it serves.
                     "TimeoutStartSec=300",
                     "TimeoutStopSec=10"],
                    after=drivers + cameras)
    services = [u for u in drivers + cameras + [infer] if u in units.files]
    units.files[target] = "\n".join([
        "# Written by `armada systemd`: every process of the cell; `systemctl start|stop` this target.",
        "[Unit]",
        f"Description=armada cell {cell_name}",
        "Wants=" + " ".join(services),
        "After=network-online.target",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])
    units.files[f"sysusers.d/armada-{opts.user}.conf"] = "\n".join([
        "# The dedicated user armada's units run as, with the device groups (created if missing).",
        f'u {opts.user} - "armada robot runtime" /var/lib/armada',
        *(f"m {opts.user} {g}" for g in DEVICE_GROUPS),
        "",
    ])
    return units


def enable_instructions(units: UnitSet, out: Path, user: str) -> str:
    sysusers = out / f"sysusers.d/armada-{user}.conf"
    unit_files = " ".join(str(out / n) for n in units.files if "/" not in n)
    dropins = sorted({str(out / n.split("/")[0]) for n in units.files if n.split("/")[0].endswith(".service.d")})
    lines = [
        f"sudo install -m 0644 {sysusers} /etc/sysusers.d/ && sudo systemd-sysusers",
        f"sudo install -m 0644 {unit_files} /etc/systemd/system/",
        *(f"sudo cp -r {d} /etc/systemd/system/" for d in dropins),
        "sudo systemctl daemon-reload",
        f"sudo systemctl enable --now {units.target}",
        f"systemctl status '{units.target.removesuffix('.target')}-*'    # READY, STATUS and the watchdog per process",
        f"journalctl -u '{units.target.removesuffix('.target')}-*' -f",
    ]
    return "\n".join(lines)


def write(units: UnitSet, out: Path) -> list[Path]:
    written = []
    for name, text in units.files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def add_systemd_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("systemd", help="write the systemd units of a cell and say how to enable them")
    p.add_argument("cell", help="the cell file")
    p.add_argument("--out", type=Path, required=True, help="folder to write the units into (created)")
    p.add_argument("--user", default=DEFAULT_USER, help=f"the dedicated user the units run as (default {DEFAULT_USER})")
    p.add_argument("--venv", type=Path, default=None,
                   help="the virtual environment holding armada (default: the one running this command)")
    p.add_argument("--cell-path", type=Path, default=None,
                   help="where the cell file will be on the robot PC (default: CELL's absolute path)")
    p.add_argument("--keys", type=Path, default=None,
                   help="this host's CURVE key folder written by `armada keys` (set as ARMADA_KEYS)")
    p.add_argument("--roles", default=",".join(ROLES),
                   help="the processes that run on this host, comma separated (default: all: driver,camera,infer)")
    p.add_argument("--driver-watchdog-s", type=float, default=DRIVER_WATCHDOG_S,
                   help=f"WatchdogSec of the drivers: a control loop silent this long is restarted "
                        f"(default {DRIVER_WATCHDOG_S:g})")


def run_systemd(args: argparse.Namespace) -> int:
    cell = load_cell(args.cell, Path("/run/armada/cell"))  # a bad cell: ConfigError, exit 2 in the CLI
    venv = Path(args.venv if args.venv is not None else sys.prefix).absolute()
    cell_path = Path(args.cell_path if args.cell_path is not None else args.cell).absolute()
    try:
        keys = Path(args.keys).absolute() if args.keys is not None else None
        roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
        units = render(cell, Options(cell_path=cell_path, user=args.user, venv=venv,
                                     driver_watchdog_s=args.driver_watchdog_s, keys=keys, roles=roles))
    except UnitError as exc:
        print(f"armada systemd: {exc}", file=sys.stderr)
        return 2
    if not (venv / "bin" / "armada").exists():
        print(f"armada systemd: warning: {venv / 'bin' / 'armada'} does not exist here; it must on the robot PC",
              file=sys.stderr)
    written = write(units, args.out)
    print(f"armada systemd: wrote {len(written)} files for cell {cell.name} into {args.out}:")
    for path in written:
        print(f"  {path}")
    print("\nInstall and start them (as root):")
    print(enable_instructions(units, args.out, args.user))
    return 0
