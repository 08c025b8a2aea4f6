"""The AgileX PiPer behind the Backend interface, through the vendor's piper_sdk.

piper_sdk is imported inside ``connect`` so that the driver core (and every process that never
talks to a PiPer) does not depend on it. Units: the action layout is six joints in rad and the
gripper opening in m; the SDK speaks 0.001 deg and 0.001 mm.

Notes on the SDK (0.6.2) that this backend works around:
- ``C_PiperInterface_V2`` is a singleton per CAN name that never forgets an instance; we drop ours
  from the cache on ``close`` so a later ``connect`` gets fresh state.
- Command calls (JointCtrl, GripperCtrl, ...) never raise and return None: send failures are only
  logged. Loss of the link therefore shows up as stale feedback, which ``read`` reports.
- Feedback timestamps are the CAN frames' wall-clock receive times (``time.time()``).
- ``EmergencyStop(0x02)`` ("resume") sends the same frame as ``ResetPiper()``, which the SDK
  documents as cutting power to the arm. ``release_estop`` therefore must only be used with the
  arm supported or at rest; it re-enables and re-selects CAN joint mode afterwards.
"""

from __future__ import annotations

import math
import time

import numpy as np

from drivers.core.backend import Backend, BackendError, Reading

N_JOINTS = 6
STALE_S = 0.05  # feedback older than this is a read error
# A powered PiPer streams feedback at 200 Hz from the moment the bus is up: no frame at all in this
# long means no arm on this bus (or the bus is down), and waiting out the full deadline helps nobody.
FIRST_FEEDBACK_S = 1.5
MDEG_PER_RAD = math.degrees(1.0) * 1000.0  # 0.001 deg per rad
UM_PER_M = 1e6  # 0.001 mm per m
ARM_STATUS_ESTOP = 0x01
# arm_status values (0x2A1 byte 1) that mean the controller cannot go on by itself.
ARM_STATUS_FAULTS = {
    0x05: "joint communication error",
    0x06: "joint brake not released",
    0x07: "collision detected",
    0x08: "overspeed while drag-teaching",
    0x09: "joint state abnormal",
    0x0A: "other error",
    0x0E: "main controller over-temperature",
    0x0F: "release resistor over-temperature",
}


def _decode_err_code(code: int) -> list[str]:
    names = [f"joint_{i + 1} communication" for i in range(6) if code & (1 << i)]
    names += [f"joint_{i + 1} angle limit" for i in range(6) if code & (1 << (8 + i))]
    return names


class PiperBackend(Backend):
    def __init__(self, can_name: str, embodiment, bustype: str = "socketcan", speed_pct: int = 50,
                 gripper_effort: int = 1000, stale_s: float = STALE_S, allow_reset_on_resume: bool = False,
                 zero_offsets_rad: np.ndarray | None = None):
        # piper_sdk 0.6.2's "resume" frame is its reset frame, documented as cutting motor power:
        # a raised arm would drop. Resuming is refused unless the cell says the arm is supported.
        self.allow_reset_on_resume = allow_reset_on_resume
        self.can_name = can_name
        self.bustype = bustype
        self.speed_pct = int(speed_pct)
        self.gripper_effort = int(gripper_effort)  # 0.001 N·m, 0..5000
        self.stale_s = stale_s
        dof = getattr(embodiment, "dof", None)
        if dof is not None and dof != N_JOINTS + 1:
            raise ValueError(f"PiPer backend needs 7 dofs (6 joints + gripper), embodiment has {dof}")
        self._piper = None
        # From `armada calibrate joints piper-zero`: what each joint reads at the mechanical zero.
        # Readings are corrected by it and targets shifted back, until the firmware zero is set.
        self.zero_offsets = np.zeros(N_JOINTS) if zero_offsets_rad is None else np.asarray(zero_offsets_rad, float)
        if self.zero_offsets.shape != (N_JOINTS,) or not np.all(np.isfinite(self.zero_offsets)):
            raise ValueError(f"PiPer zero offsets must be 6 finite values (rad), got {zero_offsets_rad!r}")

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if self._piper is not None:  # reconnect: drop the old SDK instance and its buses first
            self.close()
        try:
            from piper_sdk import C_PiperInterface_V2
        except ImportError as exc:
            raise BackendError(f"piper_sdk is not installed ({exc}); pip install piper_sdk", transient=False) from None
        piper = self._open_bus(C_PiperInterface_V2)
        self._piper = piper
        piper.ConnectPort()

        # 1. feedback must flow.
        first_deadline = min(deadline, time.monotonic() + FIRST_FEEDBACK_S)
        while not self._fresh(piper.GetArmJointMsgs().time_stamp):
            if time.monotonic() > first_deadline:
                self.close()
                raise BackendError(f"PiPer on {self.can_name}: no joint feedback within "
                                   f"{min(timeout_s, FIRST_FEEDBACK_S):.1f} s (arm powered? CAN wired and up? "
                                   "the right interface?)", transient=False)
            time.sleep(0.005)
        # 2. enable all motors and wait until every one reports enabled in fresh motor frames.
        enabled_after = time.time()
        last_sent = 0.0
        while True:
            low = piper.GetArmLowSpdInfoMsgs()
            states = piper.GetArmEnableStatus()
            if low.time_stamp > enabled_after and all(states):
                break
            if time.monotonic() > deadline:
                off = [f"joint_{i + 1}" for i, on in enumerate(states) if not on]
                self.close()
                raise BackendError(f"PiPer on {self.can_name}: motors {', '.join(off) or '(no motor feedback)'} "
                                   f"stayed disabled after enable for {timeout_s:.1f} s", transient=False)
            if time.monotonic() - last_sent > 0.05:
                piper.EnableArm(7, 0x02)
                last_sent = time.monotonic()
            time.sleep(0.005)
        # 3. CAN command mode, MOVE J, our speed; confirm in the status frame.
        last_sent = 0.0
        while piper.GetArmStatus().arm_status.ctrl_mode != 0x01:
            if time.monotonic() > deadline:
                self.close()
                raise BackendError(f"PiPer on {self.can_name}: did not enter CAN control mode within "
                                   f"{timeout_s:.1f} s", transient=False)
            if time.monotonic() - last_sent > 0.05:
                piper.MotionCtrl_2(0x01, 0x01, self.speed_pct, 0x00)
                last_sent = time.monotonic()
            time.sleep(0.005)
        # Enable the gripper where it is, so the first write does not jump it.
        g = piper.GetArmGripperMsgs().gripper_state.grippers_angle
        piper.GripperCtrl(int(g), self.gripper_effort, 0x01, 0x00)

    def _open_bus(self, sdk_class):
        real = self.bustype == "socketcan"
        if self.bustype == "udp_multicast":
            from drivers.piper.fake.bus import check_multicast_group

            try:
                check_multicast_group(self.can_name)
            except ValueError as exc:
                raise BackendError(f"PiPer on {self.can_name}: {exc}", transient=False) from None
        try:
            piper = sdk_class(self.can_name, judge_flag=False, can_auto_init=False)
            # judge_flag checks that a socketcan interface exists, is up and runs at 1 Mbit/s.
            piper.CreateCanBus(self.can_name, bustype=self.bustype, judge_flag=real)
        except Exception as exc:
            self._forget()
            cause = f" ({exc.__context__})" if exc.__context__ is not None else ""
            raise BackendError(f"PiPer on {self.can_name}: cannot open the CAN bus: {exc}{cause}",
                               transient=False) from None
        can_port = getattr(piper, "_C_PiperInterface_V2__arm_can", None)
        if can_port is not None and getattr(can_port, "recv_bus", True) is None:
            self._forget()
            raise BackendError(f"PiPer on {self.can_name}: CAN bus ({self.bustype}) did not open", transient=False)
        if self.bustype == "udp_multicast":
            # Other multicast groups on the same UDP port would leak in (see drivers/piper/fake/bus.py).
            from drivers.piper.fake.bus import isolate

            for name in ("recv_bus", "send_bus"):
                bus = getattr(can_port, name, None)
                if bus is not None:
                    isolate(bus)
        return piper

    @property
    def sdk(self):
        """The piper_sdk interface, for reads this backend does not wrap (a master arm's commands)."""
        return self._sdk()

    def close(self) -> None:
        """Disconnect. Never disables the motors: a raised arm must not fall."""
        piper, self._piper = self._piper, None
        if piper is not None:
            try:
                piper.DisconnectPort()
            except Exception:
                pass
        self._forget()

    def _forget(self) -> None:
        try:
            from piper_sdk import C_PiperInterface_V2
            with C_PiperInterface_V2._lock:
                C_PiperInterface_V2._instances.pop(self.can_name, None)
        except Exception:
            pass

    # ------------------------------------------------------------------ i/o

    def _fresh(self, stamp: float) -> bool:
        return stamp > 0 and time.time() - stamp <= self.stale_s

    def _sdk(self):
        if self._piper is None:
            raise BackendError(f"PiPer on {self.can_name} is not connected", transient=False)
        return self._piper

    def read(self) -> Reading:
        piper = self._sdk()
        joints = piper.GetArmJointMsgs()
        gripper = piper.GetArmGripperMsgs()
        status = piper.GetArmStatus()
        wall, mono = time.time(), time.monotonic_ns()
        age = wall - joints.time_stamp
        if joints.time_stamp <= 0 or age > self.stale_s:
            raise BackendError(f"PiPer on {self.can_name}: joint feedback is stale ({age * 1e3:.0f} ms old)")
        js = joints.joint_state
        q = np.array([js.joint_1, js.joint_2, js.joint_3, js.joint_4, js.joint_5, js.joint_6], dtype=np.float64)
        position = np.append(q / MDEG_PER_RAD - self.zero_offsets, gripper.gripper_state.grippers_angle / UM_PER_M)
        high = piper.GetArmHighSpdInfoMsgs()
        velocity = None
        if self._fresh(high.time_stamp):
            speeds = [getattr(high, f"motor_{i + 1}").motor_speed for i in range(N_JOINTS)]
            velocity = np.append(np.asarray(speeds, dtype=np.float64) / 1000.0, 0.0)
        st = status.arm_status
        arm_status = int(st.arm_status)
        fault = None
        problems = _decode_err_code(int(st.err_code)) if self._fresh(status.time_stamp) else []
        if arm_status in ARM_STATUS_FAULTS:
            problems.insert(0, ARM_STATUS_FAULTS[arm_status])
        if problems:
            fault = f"PiPer reports: {', '.join(problems)}"
        return Reading(position=position, mono_ns=mono - int(age * 1e9), velocity=velocity,
                       estopped=arm_status == ARM_STATUS_ESTOP, fault=fault)

    def write(self, position: np.ndarray) -> None:
        piper = self._sdk()
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (N_JOINTS + 1,) or not np.all(np.isfinite(p)):
            raise BackendError(f"PiPer write needs 7 finite values, got {p!r}", transient=False)
        mdeg = [int(round(v * MDEG_PER_RAD)) for v in p[:N_JOINTS] + self.zero_offsets]
        piper.JointCtrl(*mdeg)
        piper.GripperCtrl(int(round(p[N_JOINTS] * UM_PER_M)), self.gripper_effort, 0x01, 0x00)

    def estop(self) -> None:
        self._sdk().EmergencyStop(0x01)

    def release_estop(self) -> None:
        """Resume after an e-stop. The SDK's resume frame is its reset frame (see module notes)."""
        if not self.allow_reset_on_resume:
            raise BackendError("PiPer resume is the SDK's reset frame, which cuts motor power: a raised arm "
                               "would fall. Support the arm (or lower it) and set allow_reset_on_resume in "
                               "the cell's backend section to resume from software", transient=False)
        piper = self._sdk()
        piper.EmergencyStop(0x02)
        time.sleep(0.02)
        piper.EnableArm(7, 0x02)
        piper.MotionCtrl_2(0x01, 0x01, self.speed_pct, 0x00)


def build_in_worker(**kwargs) -> PiperBackend:
    """What an isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    can_name = kwargs.pop("can_name")
    return PiperBackend(can_name, None, **kwargs)
