"""Mock cells for the fleet's tests and benchmark: a mock arm, two synthetic cameras and a policy
that is either ``remote`` (the model service) or the same tiny bundle run locally (``mergevla``).

``FleetCell`` starts the cell's driver and cameras as processes (CellProcesses) and its inference
process either as a process of its own (``armada infer``, or ``python -m armada.runtime.fleet.cells``
which registers the ``remote`` kind first where the installed package does not yet name it) or
in this process, in a thread (``inprocess``): the same InferenceProcess class, whose policy object
(and its service notes) the caller can then read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from armada.runtime.config import CONFIG_DIR, CellConfig, load_cell

MOCK_ARM = CONFIG_DIR / "embodiments" / "mock_arm.yaml"


@dataclass(frozen=True)
class CellSpec:
    name: str
    url: str | None  # the service; None: the tiny bundle in the cell's own inference process
    camera_size: tuple[int, int] = (640, 480)
    chunk_size: int = 8
    dt: float = 0.02
    control_hz: float | None = None  # the driver's rate; None: the embodiment's
    policy_timeout_s: float | None = None
    failover_s: float | None = None
    tiny_tasks: int = 2


def write_cell(run_dir: Path, spec: CellSpec) -> tuple[Path, Path]:
    """(the cell, the same cell with the scripted policy): the second is what the driver and camera
    processes load when the ``remote`` kind is not registered (they never use the policy)."""
    width, height = spec.camera_size
    if spec.url is not None:
        policy: dict[str, Any] = {"kind": "remote", "url": spec.url}
        if spec.failover_s is not None:
            policy["failover_s"] = spec.failover_s
    else:
        policy = {"kind": "mergevla", "bundle": "tiny", "tiny_tasks": spec.tiny_tasks}
    driver: dict[str, Any] = {"name": "arm", "embodiment": str(MOCK_ARM),
                              "backend": {"kind": "mock", "tracking_time_constant_s": 0.02, "latency_s": 0.004},
                              "state": "ipc://{run_dir}/arm-state", "cmd": "ipc://{run_dir}/arm-cmd",
                              "lease_ttl_s": 0.3}
    if spec.control_hz:
        driver["control_rate_hz"] = spec.control_hz
    inference: dict[str, Any] = {
        "ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/events", "policy": policy,
        "chunking": {"size": spec.chunk_size, "dt": spec.dt, "mode": "async", "execute": spec.chunk_size,
                     "merge": "replace"},
        "max_frame_age_s": 0.25, "max_state_age_s": 0.1, "episode_duration_s": 5}
    if spec.policy_timeout_s is not None:
        inference["policy_timeout_s"] = spec.policy_timeout_s
    data = {"name": spec.name, "drivers": [driver],
            "cameras": [{"name": n, "width": width, "height": height, "fps": 30, "frames": f"ipc://{{run_dir}}/cam-{n}"}
                        for n in ("front", "wrist")],
            "inference": inference}
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cell = run_dir / "cell.yaml"
    cell.write_text(yaml.safe_dump(data))
    io = run_dir / "cell-io.yaml"
    io.write_text(yaml.safe_dump({**data, "inference": {**inference, "policy": {"kind": "scripted"}}}))
    return cell, io


def remote_registered() -> bool:
    from armada.runtime.inference.registry import POLICIES

    return "remote" in POLICIES.kinds()


@contextlib.contextmanager
def policy_kind_available() -> Iterator[None]:
    """The ``remote`` kind for this process: the installed entry point, or registered for the block."""
    from armada.runtime.fleet.plugin import PLUGIN
    from armada.runtime.inference.registry import POLICIES

    if remote_registered():
        yield
    else:
        with POLICIES.extra(PLUGIN):
            yield


@dataclass
class FleetCell:
    run_dir: Path
    spec: CellSpec
    inprocess: bool = True
    cell: CellConfig = field(init=False)
    process: Any = None  # the in-process InferenceProcess
    _procs: Any = None
    _thread: threading.Thread | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _infer: subprocess.Popen | None = None

    def __enter__(self) -> "FleetCell":
        from armada.runtime.supervisor import CellProcesses

        cell_path, io_path = write_cell(self.run_dir, self.spec)
        subprocess_inference = not self.inprocess and (self.spec.url is None or remote_registered())
        own_launcher = not self.inprocess and not subprocess_inference
        self._procs = CellProcesses(cell_path if subprocess_inference else io_path, self.run_dir)
        try:
            for d in self._procs.cell.drivers:
                self._procs.spawn("driver", d.name)
            for c in self._procs.cell.cameras:
                self._procs.spawn("camera", c.name)
            if subprocess_inference:
                self._procs.spawn("infer")
                self.cell = self._procs.cell
            elif own_launcher:
                with policy_kind_available():
                    self.cell = load_cell(cell_path, self.run_dir)
                with open(self.run_dir / "logs" / "infer.log", "ab") as log:
                    self._infer = subprocess.Popen([sys.executable, "-m", "armada.runtime.fleet.cells", str(cell_path),
                                                    str(self.run_dir)], stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL)
            else:
                # Registered for the cell's whole life: the process looks the kind up at each episode start.
                self._stack.enter_context(policy_kind_available())
                self.cell = load_cell(cell_path, self.run_dir)
                from armada.runtime.inference.process import InferenceProcess, make_policy

                self.process = InferenceProcess(self.cell, make_policy(self.cell))
                self._thread = threading.Thread(target=self.process.run, daemon=True, name=f"infer-{self.spec.name}")
                self._thread.start()
            self._procs.wait_ready()
            if self._infer is not None:
                self._wait_inference(90.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @property
    def ctx(self) -> Any:
        return self._procs.ctx

    def pids(self) -> dict[str, int]:
        """The cell's processes by label (this process for an in-process inference)."""
        out = {c.label: c.proc.pid for c in self._procs.children}
        if self.process is not None:
            out["infer"] = os.getpid()
        return out

    def _wait_inference(self, timeout_s: float) -> None:
        from armada.runtime.supervisor import answers_hello

        deadline = time.monotonic() + timeout_s
        while not answers_hello(self.ctx, self.cell.inference.ctl, self.cell.curve, "fleet", 0.3):
            if self._infer is not None and self._infer.poll() is not None:
                raise RuntimeError(f"the inference process of {self.spec.name} exited ({self._infer.returncode}); "
                                   f"see {self.run_dir / 'logs' / 'infer.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the inference process of {self.spec.name} did not answer within {timeout_s:.0f} s")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._infer is not None and self._infer.poll() is None:
            self._infer.send_signal(signal.SIGTERM)  # it ends its episode and releases the leases first
            try:
                self._infer.wait(10)
            except subprocess.TimeoutExpired:
                self._infer.kill()
                self._infer.wait(5)
        if self.process is not None:
            self.process.request_stop()
            if self._thread is not None:
                self._thread.join(timeout=10)
        try:
            if self._procs is not None:
                self._procs.close()  # stops the children (inference first), releases the run dir
        finally:
            self._stack.close()


def _main(argv: list[str]) -> int:
    """``python -m armada.runtime.fleet.cells CELL RUN_DIR``: a cell's inference process with the
    ``remote`` kind registered (for the benchmark, where the installed package may not name it yet)."""
    from armada.runtime.inference.process import run_inference

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with policy_kind_available():
        run_inference(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
