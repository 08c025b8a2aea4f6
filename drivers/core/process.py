"""The generic driver process: a fixed-rate control loop plus a command server.

Two threads share one lock. The loop thread ticks on monotonic deadlines (never ``sleep(dt)``)
and owns the state PUB socket; the command thread blocks on the ROUTER socket so a command is
answered at once instead of at the next tick. Each socket is used by one thread only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from drivers.core.backend import Backend, BackendError
from drivers.core.driver import Driver, Mode, TickResult
from drivers.core.isolated import IsolatedBackend
from runtime.config import CellConfig, DriverConfig, EmbodimentConfig, driver_embodiment, load_cell, named
from runtime.protocol import ErrorCode, ProtocolError
from runtime.transport import CommandServer, Publisher, start_authenticator

log = logging.getLogger("armada.driver")

CONNECT_TIMEOUT_S = 5.0
GIL_SWITCH_INTERVAL_S = 0.0002
PERIOD_HISTORY = 60_000  # ticks of period history kept for `stats` (two minutes at 500 Hz)


def make_backend(cfg: DriverConfig, emb: EmbodimentConfig, cell_path: Path | None = None) -> Backend:
    """Import only the backend this driver needs (no torch, no lerobot for a mock arm)."""
    if cfg.backend.kind == "mock":
        from drivers.mock.arm import MockArm

        b = cfg.backend
        return MockArm(emb.home, b.tracking_time_constant_s, b.latency_s, b.noise_std, b.seed)
    # Vendor SDKs run in a worker process (drivers/core/isolated.py says why).
    if getattr(cfg.backend, "bustype", None) == "virtual":
        raise ValueError("bustype virtual only connects buses inside one process, and the "
                         "device runs in a worker process: use udp_multicast with `armada fake piper`, or "
                         "socketcan for a real arm")
    if cfg.backend.kind == "piper":
        from drivers.piper.backend import N_JOINTS

        b = cfg.backend
        if emb.dof != N_JOINTS + 1:
            raise ValueError(f"PiPer backend needs 7 dofs (6 joints + gripper), embodiment {emb.name} has {emb.dof}")
        offsets = _piper_zero_offsets(cfg, cell_path)
        kwargs = {"can_name": b.can, "bustype": b.bustype, "speed_pct": b.speed_pct, "gripper_effort": b.gripper_effort,
                  "stale_s": b.stale_s, "allow_reset_on_resume": b.allow_reset_on_resume,
                  "zero_offsets_rad": None if offsets is None else [float(v) for v in offsets]}
        return IsolatedBackend("drivers.piper.backend:build_in_worker", kwargs, f"PiPer on {b.can}",
                               realtime_priority=cfg.realtime_priority)
    if cfg.backend.kind == "ur3":
        from drivers.ur3.backend import make_ur3_backend

        return make_ur3_backend(cfg.backend, emb, realtime_priority=cfg.realtime_priority)
    if cfg.backend.kind == "cobot_magic":
        kwargs = {"cfg": cfg.backend.model_dump(), "emb": emb.model_dump(), "follow_masters": cfg.backend.follow_masters}
        return IsolatedBackend("drivers.cobot_magic.backend:build_in_worker", kwargs, "Cobot Magic",
                               realtime_priority=cfg.realtime_priority)
    raise ValueError(f"unknown backend kind {cfg.backend.kind!r}")


def _piper_zero_offsets(cfg: DriverConfig, cell_path: Path | None):
    if cfg.joint_calibration is None:
        return None
    from calibration.joints import PiperZero
    from calibration.results import load_joint_calibration
    from runtime.config import ConfigError, resolve_cell_file

    cal = load_joint_calibration(resolve_cell_file(cell_path, cfg.joint_calibration))
    if not isinstance(cal, PiperZero):
        raise ConfigError(cell_path or "<cell>", f"driver {cfg.name}: joint_calibration",
                          "a PiPer driver takes a piper-zero calibration (armada calibrate joints piper-zero)")
    return cal.offsets_rad


@dataclass
class LoopTiming:
    """Tick start lateness and periods, kept in a fixed ring so the loop never allocates."""

    period_ns: int
    lateness_ns: np.ndarray
    periods_ns: np.ndarray
    count: int = 0
    last_start_ns: int = 0

    @classmethod
    def create(cls, rate_hz: float) -> "LoopTiming":
        return cls(int(round(1e9 / rate_hz)), np.zeros(PERIOD_HISTORY, np.int64), np.zeros(PERIOD_HISTORY, np.int64))

    def record(self, start_ns: int, deadline_ns: int) -> None:
        i = self.count % PERIOD_HISTORY
        self.lateness_ns[i] = start_ns - deadline_ns
        self.periods_ns[i] = start_ns - self.last_start_ns if self.last_start_ns else self.period_ns
        self.last_start_ns = start_ns
        self.count += 1

    def summary(self) -> dict[str, float]:
        n = min(self.count, PERIOD_HISTORY)
        if n < 2:
            return {"ticks": self.count}
        periods = self.periods_ns[:n] * 1e-6
        error = np.abs(periods - self.period_ns * 1e-6)
        return {"ticks": self.count, "window": n, "period_ms": self.period_ns * 1e-6,
                "period_p50_ms": float(np.percentile(periods, 50)), "period_p99_ms": float(np.percentile(periods, 99)),
                "period_max_ms": float(periods.max()), "error_p50_ms": float(np.percentile(error, 50)),
                "error_p99_ms": float(np.percentile(error, 99)), "error_max_ms": float(error.max()),
                "lateness_p99_ms": float(np.percentile(self.lateness_ns[:n], 99) * 1e-6)}

    def reset(self) -> None:
        self.count, self.last_start_ns = 0, 0


class DriverProcess:
    def __init__(self, cfg: DriverConfig, emb: EmbodimentConfig, backend: Backend, cell: CellConfig | None = None):
        self.cfg = cfg
        self.driver = Driver(emb, backend, cfg.lease_ttl_s)
        self.ctx = zmq.Context()
        curve = cell.curve if cell else None
        self.auth = start_authenticator(self.ctx, curve)
        self.state_pub = Publisher(self.ctx, cfg.state, hwm=100, curve=curve)
        self.server = CommandServer(self.ctx, cfg.cmd, curve=curve)
        self.timing = LoopTiming.create(emb.control_rate_hz)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.decimation = emb.state_decimation

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        # When the command thread holds the GIL, the loop thread waits up to the switch interval
        # (5 ms by default: two and a half ticks at 500 Hz). Ask for a hand-over within 0.2 ms.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        try:
            self.driver.connect(CONNECT_TIMEOUT_S)
        except BackendError as exc:
            raise SystemExit(f"driver {self.cfg.name}: cannot connect to the device: {exc}") from None
        log.info("driver %s up: %s at %.0f Hz, %s, disarmed", self.cfg.name, self.driver.emb.name,
                 self.driver.emb.control_rate_hz, self.cfg.cmd)
        commands = threading.Thread(target=self._serve_commands, name="commands", daemon=True)
        commands.start()
        try:
            self._control_loop()
        finally:
            self.stop_event.set()
            commands.join(timeout=1.0)
            self._shutdown()

    def _control_loop(self) -> None:
        self._raise_priority()
        period = self.timing.period_ns
        deadline = time.monotonic_ns() + period
        while not self.stop_event.is_set():
            _sleep_until(deadline)
            start = time.monotonic_ns()
            self.timing.record(start, deadline)
            with self.lock:
                # Tick at the deadline, not the wake-up time: targets are sampled on the fixed
                # grid the safety filter assumes, so wake-up jitter shifts when a command leaves,
                # never what it is.
                result = self.driver.tick(deadline)
                if self.driver.counters.ticks % self.decimation == 0:
                    self._publish_state(result, deadline)
            deadline += period
            now = time.monotonic_ns()
            if now > deadline:
                # Missed one or more deadlines: count it and skip ahead rather than burst.
                missed = (now - deadline) // period + 1
                with self.lock:
                    self.driver.counters.overruns += int(missed)
                deadline += missed * period

    def _raise_priority(self) -> None:
        """Run this thread (the loop, not the command server) under SCHED_FIFO when configured."""
        priority = self.cfg.realtime_priority
        if priority is None:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            log.info("control loop runs SCHED_FIFO priority %d", priority)
        except (PermissionError, OSError) as exc:
            log.warning("cannot run the control loop real-time (%s): expect more jitter and overruns; "
                        "grant CAP_SYS_NICE or LimitRTPRIO (see systemd/armada-driver@.service)", exc)

    def _publish_state(self, r: TickResult, now_ns: int) -> None:
        d = self.driver
        counters = d.counters.as_dict()
        counters["clamps"] = d.filter.counters.as_dict()
        counters["rejected_messages"] = self.server.counters.rejected
        fields = {"mono_ns": now_ns, "mode": d.mode.value, "measured": r.measured, "requested": r.requested,
                  "commanded": r.commanded, "velocity": r.velocity, "counters": counters}
        if r.episode is not None:
            fields["episode"] = r.episode
        if r.chunk is not None:
            fields["chunk"] = r.chunk
        if d.reason:
            fields["reason"] = d.reason
        if d.lease.holder:
            fields["lease_holder"] = d.lease.holder
        if d.last_reading is not None and d.last_reading.extras:
            fields["device"] = d.last_reading.extras
        self.state_pub.publish("state", **fields)

    # ------------------------------------------------------------------ commands

    def _serve_commands(self) -> None:
        while not self.stop_event.is_set():
            if not self.server.poll(0.05):
                continue
            while (req := self.server.recv()) is not None:
                if req.error is not None:
                    self.server.reply_error(req, req.error.code, req.error.reason)
                    continue
                self._handle(req)

    def _handle(self, req) -> None:
        msg = req.msg
        try:
            with self.lock:
                now = time.monotonic_ns()
                if msg["kind"] == "stats":
                    data = self.driver.handle(msg, now)
                    data["loop"] = self.timing.summary()
                    if msg.get("reset"):
                        self.timing.reset()
                else:
                    data = self.driver.handle(msg, now)
        except ProtocolError as err:
            self.server.reply_error(req, err.code, err.reason)
            return
        except Exception as exc:  # a bug in one handler must not take the arm's loop down
            log.exception("command %s failed", msg.get("kind"))
            self.server.reply_error(req, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        self.server.reply_ok(req, **data)

    # ------------------------------------------------------------------ shutdown

    def request_stop(self, *_: object) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        with self.lock:
            if self.driver.mode in (Mode.ARMED, Mode.RUNNING):
                log.warning("driver %s stopping while %s: holding position, torque stays on",
                            self.cfg.name, self.driver.mode.value)
            try:
                self.driver.backend.close()  # backends hold position on close; they never cut torque
            except BackendError as exc:
                log.error("closing the device failed: %s", exc)
        self.state_pub.close()
        self.server.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _sleep_until(deadline_ns: int) -> None:
    remaining = deadline_ns - time.monotonic_ns()
    if remaining > 0:
        time.sleep(remaining * 1e-9)


def run_driver(cell_path: str | Path | None, name: str | None, run_dir: str | Path | None) -> None:
    cell = load_cell(cell_path, run_dir)
    cfg = named(cell.driver, name, cell_path)
    emb = driver_embodiment(Path(cell_path) if cell_path else None, cfg)
    try:
        backend = make_backend(cfg, emb, Path(cell_path) if cell_path else None)
    except ValueError as exc:  # a backend that cannot work with this embodiment or bus: say so, no traceback
        raise SystemExit(f"driver {cfg.name}: {exc}") from None
    process = DriverProcess(cfg, emb, backend, cell)
    signal.signal(signal.SIGTERM, process.request_stop)
    signal.signal(signal.SIGINT, process.request_stop)
    process.run()
