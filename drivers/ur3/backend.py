"""A Universal Robots UR3 (CB3 or e-Series) behind the Backend interface, through ur-rtde.

ur-rtde runs in a worker process (drivers/core/isolated.py): it blocks without a timeout on a
silent peer while holding the GIL, and 1.6.5 crashed the process (SIGSEGV) after a dropped link.
The ur-rtde side is drivers/ur3/rtde_backend.py; this module builds the isolated driver side.

Streaming: one ``servoJ`` per control tick, with ``time`` equal to the tick period, so the robot
interpolates between our (already filtered) targets. The driver loop paces the ticks on absolute
monotonic deadlines; docs/driver-notes.md says why that replaces ur-rtde's initPeriod/waitPeriod.

Safety mapping, read every tick from the RTDE stream:
  * robot or system emergency stop -> ``Reading.estopped`` (the driver latches e-stop),
  * protective/safeguard stop, violation, fault, robot not RUNNING, or our control script no longer
    running on the controller -> ``Reading.fault`` (the driver stops commanding),
  * no new RTDE data for 50 ms, the connection gone, or the worker silent or dead -> a read error,
    which the driver turns into a fault after 0.1 s.
Nothing recovers by itself. ``recover`` (the driver's ``clear_fault``) and ``release_estop``
(``reset_estop``) reconnect if needed, unlock a protective stop through the dashboard and re-upload
the control script, only when the operator asks. Power-on and brake release stay on the pendant.

The RTDE watchdog is armed on the control script: if nothing kicks it (a hung loop, a killed
driver or worker), the controller itself stops the arm. It watches the command register, which every
servoJ updates; an explicit kick ("no command" in that register) goes out only in ticks without a
servoJ (rtde_backend.py says why).

When the driver faults, its worker is ended at once (IsolatedBackend.on_fault), and a worker whose
controller closes an RTDE link ends itself: ur-rtde's own reconnect would restart the control script
without our watchdog and resend servoJ. Only ``clear_fault`` starts a new worker.
"""

from __future__ import annotations

import numpy as np

from armada.drivers.core.isolated import IsolatedBackend, WorkerTimeouts
from armada.drivers.ur3.rtde_backend import UR3RtdeBackend
from armada.drivers.ur3.config import N_JOINTS, UR3BackendConfig, check_embodiment  # noqa: F401 (N_JOINTS re-exported)
from armada.runtime.config import EmbodimentConfig

# Probe 3 s + ur-rtde's own 5 s wait for the control script to start, on top of the driver's budget.
UR3_TIMEOUTS = WorkerTimeouts(io_s=0.02, stop_s=0.25, connect_extra_s=8.0, recover_s=8.0)


def make_ur3_backend(cfg: UR3BackendConfig, emb: EmbodimentConfig,
                     realtime_priority: int | None = None) -> IsolatedBackend:
    check_embodiment(cfg, emb)
    kwargs = {"host": cfg.host, "dashboard_port": cfg.dashboard_port, "rate_hz": emb.control_rate_hz,
              "watchdog_min_hz": cfg.watchdog_min_hz,
              # servoStop decelerates every joint at one rate: the lowest of the joints' limits.
              "stop_deceleration": float(np.min(emb.max_acceleration)),
              "lookahead_s": cfg.servo_lookahead_s, "gain": cfg.servo_gain}
    note = f"; the controller's RTDE watchdog stops the arm within {1e3 / cfg.watchdog_min_hz:.0f} ms"
    return IsolatedBackend("armada.drivers.ur3.backend:build_in_worker", kwargs, f"UR3 at {cfg.host}", UR3_TIMEOUTS,
                           realtime_priority=realtime_priority, lost_link_note=note)


def build_in_worker(**kwargs) -> UR3RtdeBackend:
    """What the worker process runs (plain arguments: they crossed a process boundary as msgpack)."""
    # In the worker, a link the controller closes ends the process (rtde_backend.py says why).
    return UR3RtdeBackend(**kwargs, exit_on_link_loss=True)
