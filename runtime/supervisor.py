"""Start a cell's processes, wait until each answers, and stop them cleanly.

Used by ``armada run``, the HIL tests and the benchmarks: the processes are the same ones
systemd runs in production (``armada driver|camera|infer CELL``), started as children.

On a cell split over hosts (drivers and cameras on the robot PC, inference on a GPU host) it
starts only the processes whose endpoints bind on this host (runtime/remote/hosts.py: the addresses
this machine owns, or ``this_host``/``--this-host``) and waits, bounded, for the others to answer
over the network: a driver's hello, a camera's frame, inference's hello. The error names the
process, its host and the command that starts it there.

Children live and die with their supervisor: each is told our pid (``ARMADA_PARENT_PID``) and
asks the kernel for SIGTERM when we die, whatever kills us (``armada`` does this first thing,
see ``runtime.cli``). The kernel sends it when the *thread* that started the child exits, so
spawn children from a thread that lives as long as the supervisor (the main thread does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from armada.runtime.config import DEFAULT_CELL, CellConfig, load_cell
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.remote.hosts import Placement, ThisHost, bound_endpoints, placements
from armada.runtime.rundir import (PARENT_PID_ENV, InstanceLock, RunDirError, instance_label, open_log, prepare_run_dir,
                            remove_ipc_sockets, resolve_run_dir)
from armada.runtime.transport import CommandClient, FrameSubscriber, RemoteError

READY_TIMEOUT_S = 15.0
# Processes of other hosts: started there by systemd or by hand, maybe after us; wait this long.
REMOTE_READY_TIMEOUT_S = 30.0
# The inference process may import torch and build the tiny bundle on first use.
INFER_READY_TIMEOUT_S = 90.0


def default_run_dir(cell_name: str) -> Path:
    """The default run dir of a cell, created private (see runtime.rundir); for benchmarks and tests."""
    return resolve_run_dir(None, cell_name)


def process_endpoints(cell: CellConfig, role: str, name: str | None) -> list[str]:
    """The endpoints one process of a cell binds."""
    return [ep for _, ep in bound_endpoints(cell, role, name)]


def describe_exit(returncode: int) -> str:
    """'exited with code 3' or 'killed by SIGKILL': what an operator needs to know about a dead process."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def answers_hello(ctx: zmq.Context, endpoint: str, curve: Any, role: str, timeout_s: float = 0.5) -> bool:
    """Whether a process of the cell answers a hello on ``endpoint`` (a driver's cmd, inference's ctl)."""
    client = CommandClient(ctx, endpoint, curve, default_timeout_s=timeout_s)
    try:
        client.request("hello", version=PROTOCOL_VERSION, role=role)
        return True
    except (TimeoutError, RemoteError):
        return False
    finally:
        client.close()


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def title(self) -> str:
        """How the operator knows it: 'driver arm', 'camera front', 'inference'."""
        return "inference" if self.role == "infer" else f"{self.role} {self.name}"

    @property
    def lock_label(self) -> str:
        return instance_label(self.role, self.name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class CellProcesses:
    cell_path: Path
    run_dir: Path
    cell: CellConfig = field(init=False)
    children: list[Child] = field(default_factory=list)
    ctx: zmq.Context = field(default_factory=zmq.Context)
    lock: InstanceLock = field(init=False)
    # The addresses that are this host in the cell's endpoints; None: every address it can bind.
    this_host: tuple[str, ...] | None = None
    placements: list[Placement] = field(init=False)
    remote_timeout_s: float = REMOTE_READY_TIMEOUT_S

    def __post_init__(self) -> None:
        self.cell_path = Path(self.cell_path)
        self.run_dir = Path(os.path.abspath(self.run_dir))
        self.cell = load_cell(self.cell_path, self.run_dir)  # a bad cell is refused before anything is created
        self.placements = placements(self.cell, ThisHost.of(self.this_host))  # so is a process split over hosts
        self.run_dir = prepare_run_dir(self.run_dir)
        self.lock = InstanceLock(self.run_dir, "run")  # one supervisor per run dir
        try:
            prepare_run_dir(self.run_dir / "logs")
        except RunDirError:
            self.lock.release()
            raise

    @classmethod
    def default(cls, run_dir: Path | None = None) -> "CellProcesses":
        return cls(DEFAULT_CELL, run_dir or default_run_dir("default"))

    # ------------------------------------------------------------------ starting

    def spawn(self, role: str, name: str | None = None) -> Child:
        args = [sys.executable, "-m", "armada.runtime.cli", role, str(self.cell_path), "--run-dir", str(self.run_dir)]
        if name is not None:
            args += ["--name", name]
        label = name or role
        log_path = self.run_dir / "logs" / f"{label}.log"
        # NOTIFY_SOCKET & co. belong to the supervisor's own unit (if `armada run` runs under one): a child
        # would otherwise send READY/WATCHDOG for it (systemd logs and drops them under NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env |= {"PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        # Its own process group: Ctrl-C or a hangup at the terminal reaches only us, and we stop the
        # children in order (inference first, so drivers see the lease released and hold).
        with open_log(log_path) as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    process_group=0)
        child = Child(label, role, proc, log_path)
        self.children.append(child)
        return child

    @property
    def remote(self) -> list[Placement]:
        """The cell's processes that run on other hosts (none on a cell that is all here)."""
        return [p for p in self.placements if not p.local]

    def start_all(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start this host's processes and wait until they, and the other hosts' ones, answer."""
        for p in self.placements:
            if p.local:
                self.spawn(p.role, p.name)
        self.wait_ready(timeout_s)
        self.wait_remote(self.remote_timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        for child in list(self.children):
            extra = INFER_READY_TIMEOUT_S - timeout_s if child.role == "infer" else 0.0
            self._wait_child(child, deadline + max(0.0, extra))

    def wait_remote(self, timeout_s: float = REMOTE_READY_TIMEOUT_S) -> None:
        """Wait until every process of another host answers; a TimeoutError names the ones that do
        not, their hosts and how to start them there. Our own children dying meanwhile is an error too."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.remote)
        while waiting:
            waiting = [p for p in waiting if not self._answers_at(p.role, p.name)]
            if not waiting:
                return
            if self.dead():
                raise RuntimeError("; ".join(why for _, why in self.dead()) + " while waiting for the other hosts")
            if time.monotonic() > deadline:
                lines = [f"  {p.title} on {p.host} ({', '.join(p.endpoints)}): start it there: "
                         f"`{p.start_command(str(self.cell_path))}` (or its systemd unit, `armada systemd`)"
                         for p in waiting]
                raise TimeoutError(f"{len(waiting)} process(es) of other hosts did not answer within "
                                   f"{timeout_s:g} s:\n" + "\n".join(lines))
            time.sleep(0.2)

    def _wait_child(self, child: Child, deadline: float) -> None:
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.title} {describe_exit(child.proc.returncode)}:\n"
                                   f"{child.log_tail()}")
            if self._answers(child):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.title} did not become ready in time:\n{child.log_tail()}")
            time.sleep(0.05)

    def _answers(self, child: Child) -> bool:
        return self._answers_at(child.role, child.name)

    def _answers_at(self, role: str, name: str | None) -> bool:
        """A driver or inference answers a hello, a camera sends a frame (over CURVE where the cell says
        so: this host's keys; ipc endpoints ignore them)."""
        curve = self.cell.curve
        if role == "camera":
            sub = FrameSubscriber(self.ctx, self.cell.camera(name).frames, curve=curve)
            try:
                return sub.recv(0.5) is not None
            finally:
                sub.close()
        endpoint = self.cell.inference.ctl if role == "infer" else self.cell.driver(name).cmd
        # A remote host over a slow link needs longer than a local socket; the CURVE handshake too.
        return answers_hello(self.ctx, endpoint, curve, "supervisor", 0.3 if curve is None else 1.0)

    # ------------------------------------------------------------------ watching

    def dead(self) -> list[tuple[Child, str]]:
        """Children that have exited, each with how ('driver arm died (killed by SIGKILL)')."""
        return [(c, f"{c.title} died ({describe_exit(c.proc.returncode)})")
                for c in self.children if c.proc.poll() is not None]

    # ------------------------------------------------------------------ stopping

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every child, inference first: it ends its episode and releases the leases, so the
        drivers decelerate to a hold before they are asked to exit (they hold; they never cut torque)."""
        infer = [c for c in self.children if c.role == "infer"]
        others = [c for c in self.children if c.role != "infer"]
        for group in (infer, others):
            deadline = time.monotonic() + timeout_s  # per group: a slow inference never shortens a driver's
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
                    child.proc.send_signal(signal.SIGCONT)  # a stopped child would only see it when continued
            for child in group:
                try:
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(timeout=2.0)
        for child in self.children:
            self._clean_up_after(child)
        self.children.clear()

    def _clean_up_after(self, child: Child) -> None:
        """Remove the socket files and lock a dead child left (kill -9 skips its own clean-up).

        Only when its lock is free: then no process of that role lives on this run dir, so the
        sockets are nobody's. Other files (logs, e-stop latches) stay."""
        try:
            lock = InstanceLock(self.run_dir, child.lock_label)
        except RunDirError:
            return  # someone else runs this role here now: its sockets are live
        try:
            remove_ipc_sockets(process_endpoints(self.cell, child.role, child.name), self.run_dir)
        finally:
            lock.release()

    def close(self) -> None:
        try:
            self.stop()
            self.ctx.destroy(linger=0)  # also closes sockets a caller forgot, so exit never hangs
        finally:
            self.lock.release()

    def __enter__(self) -> "CellProcesses":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)
