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

The arm obeys joint frames only in CAN command mode and only on enabled motors. A motor that drops
out (its driver trips, the arm is power-cycled) or a mode switched on the arm (the teach button,
standby after power-on) leaves the driver commanding an arm that does not move: ``read`` reports
either as a fault naming the motors or the mode, from the motors' enable bits (0x261-0x266 byte 5,
bit 6) and the status frame's control mode (0x2A1 byte 0). Taking control (connect, ``recover``,
``release_estop``) first re-sends the measured pose as the joint target, so a firmware that kept
an older target does not jump to it, then selects CAN mode and enables the motors, each confirmed
by feedback within the deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading

N_JOINTS = 6
STALE_S = 0.05  # feedback older than this is a read error
# A powered PiPer streams feedback at 200 Hz from the moment the bus is up: no frame at all in this
# long means no arm on this bus (or the bus is down), and waiting out the full deadline helps nobody.
FIRST_FEEDBACK_S = 1.5
# Motor enable bits come in the low-speed frames (a real PiPer: about 100 Hz per motor); none this
# long and the enable state is unknown, which faults like a disabled motor.
MOTOR_STATUS_STALE_S = 0.5
RESEND_S = 0.05  # how often a mode or enable command is repeated while waiting for its confirmation
CTRL_MODE_CAN = 0x01
CTRL_MODES = {0x00: "standby", 0x01: "CAN command", 0x02: "teaching", 0x03: "Ethernet control",
              0x04: "Wi-Fi control", 0x05: "remote control", 0x06: "linkage teaching input",
              0x07: "offline trajectory"}
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


RELEASE_TIMEOUT_S = 2.0  # mode and enable confirmation after resuming from an e-stop


def _mode_name(mode: int) -> str:
    return CTRL_MODES.get(mode, f"unknown (0x{mode:02X})")


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
        # Told every joint target just before it is sent, in the SDK's 0.001 deg (Cobot Magic: our own
        # frames echoed on a fake bus must not look like a master's).
        self.on_joint_frame: Callable[[list[int]], None] | None = None
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
        # 2. CAN mode and every motor enabled, anchored at the measured pose.
        try:
            self._take_control(deadline, timeout_s)
        except BackendError:
            self.close()
            raise

    def _take_control(self, deadline: float, timeout_s: float) -> None:
        """Anchor the target at the measured pose, select CAN joint mode, enable every motor and the
        gripper where it is; the mode and the motors confirmed by fresh feedback before ``deadline``."""
        piper = self._sdk()
        self._anchor_at_measured()  # a standby arm keeps it; CAN mode then holds here, not elsewhere
        last_sent = 0.0
        while piper.GetArmStatus().arm_status.ctrl_mode != CTRL_MODE_CAN:
            if time.monotonic() > deadline:
                mode = int(piper.GetArmStatus().arm_status.ctrl_mode)
                raise BackendError(f"PiPer on {self.can_name}: did not enter CAN command mode within "
                                   f"{timeout_s:.1f} s (it reports {_mode_name(mode)} mode)", transient=False)
            if time.monotonic() - last_sent > RESEND_S:
                piper.MotionCtrl_2(CTRL_MODE_CAN, 0x01, self.speed_pct, 0x00)  # MOVE J, our speed
                last_sent = time.monotonic()
            time.sleep(0.005)
        self._anchor_at_measured()
        enabled_after = time.time()  # confirmation only from motor frames sent after our command
        last_sent = 0.0
        while True:
            low = piper.GetArmLowSpdInfoMsgs()
            states = piper.GetArmEnableStatus()
            if low.time_stamp > enabled_after and all(states):
                break
            if time.monotonic() > deadline:
                off = [f"joint_{i + 1}" for i, on in enumerate(states) if not on]
                raise BackendError(f"PiPer on {self.can_name}: motors {', '.join(off) or '(no motor feedback)'} "
                                   f"stayed disabled after enable for {timeout_s:.1f} s", transient=False)
            if time.monotonic() - last_sent > RESEND_S:
                piper.EnableArm(7, 0x02)
                last_sent = time.monotonic()
            time.sleep(0.005)
        # Enable the gripper where it is, so the first write does not jump it.
        g = piper.GetArmGripperMsgs().gripper_state.grippers_angle
        piper.GripperCtrl(int(g), self.gripper_effort, 0x01, 0x00)

    def _anchor_at_measured(self) -> None:
        """Send the measured joint angles as the joint target (raw 0.001 deg: no offsets to apply)."""
        piper = self._sdk()
        joints = piper.GetArmJointMsgs()
        if not self._fresh(joints.time_stamp):
            raise BackendError(f"PiPer on {self.can_name}: no fresh joint feedback to anchor at (arm powered? "
                               "CAN up?)", transient=False)
        js = joints.joint_state
        self._joint_ctrl([js.joint_1, js.joint_2, js.joint_3, js.joint_4, js.joint_5, js.joint_6])

    def _joint_ctrl(self, mdeg: list[int]) -> None:
        if self.on_joint_frame is not None:
            self.on_joint_frame(mdeg)
        self._sdk().JointCtrl(*mdeg)

    def _open_bus(self, sdk_class):
        real = self.bustype == "socketcan"
        if self.bustype == "udp_multicast":
            from armada.drivers.piper.multicast import check_multicast_group

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
            from armada.drivers.piper.multicast import isolate

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
        estopped = arm_status == ARM_STATUS_ESTOP
        if fault is None and not estopped:  # an e-stop explains a lost mode; the driver latches it
            fault = self._control_lost(piper, int(st.ctrl_mode), wall)
        return Reading(position=position, mono_ns=mono - int(age * 1e9), velocity=velocity,
                       estopped=estopped, fault=fault, extras={"ctrl_mode": int(st.ctrl_mode)})

    def _control_lost(self, piper, ctrl_mode: int, wall: float) -> str | None:
        """Why the arm does not obey joint frames now: a mode other than CAN, or motors disabled."""
        if ctrl_mode != CTRL_MODE_CAN:
            return (f"PiPer on {self.can_name} is in {_mode_name(ctrl_mode)} mode, not CAN command mode: "
                    "it does not follow joint targets (clear_fault re-selects CAN mode)")
        low = piper.GetArmLowSpdInfoMsgs()
        if low.time_stamp <= 0 or wall - low.time_stamp > MOTOR_STATUS_STALE_S:
            age = "none" if low.time_stamp <= 0 else f"{(wall - low.time_stamp) * 1e3:.0f} ms old"
            return f"PiPer on {self.can_name}: no motor status frames ({age}): the motors' enable state is unknown"
        off = [f"joint_{i + 1}" for i in range(N_JOINTS)
               if not getattr(low, f"motor_{i + 1}").foc_status.driver_enable_status]
        if off:
            return (f"PiPer on {self.can_name}: motor{'s' if len(off) > 1 else ''} {', '.join(off)} "
                    f"disabled (clear_fault re-enables)")
        return None

    def write(self, position: np.ndarray) -> None:
        piper = self._sdk()
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (N_JOINTS + 1,) or not np.all(np.isfinite(p)):
            raise BackendError(f"PiPer write needs 7 finite values, got {p!r}", transient=False)
        mdeg = [int(round(v * MDEG_PER_RAD)) for v in p[:N_JOINTS] + self.zero_offsets]
        self._joint_ctrl(mdeg)
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
        self._take_control(time.monotonic() + RELEASE_TIMEOUT_S, RELEASE_TIMEOUT_S)

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: CAN mode and every motor back, confirmed, anchored where the arm is.

        The driver re-anchors its own filter at the pose it reads afterwards. An engaged e-stop is
        not recovered here (reset_estop does, with its own warning)."""
        piper = self._sdk()
        joints = piper.GetArmJointMsgs()
        if not self._fresh(joints.time_stamp):
            raise BackendError(f"PiPer on {self.can_name}: no joint feedback: is the arm powered and its CAN "
                               "cable in?", transient=False)
        if int(piper.GetArmStatus().arm_status.arm_status) == ARM_STATUS_ESTOP:
            raise BackendError(f"PiPer on {self.can_name}: its e-stop is engaged: use reset_estop", transient=False)
        self._take_control(time.monotonic() + timeout_s, timeout_s)


def build_in_worker(**kwargs) -> PiperBackend:
    """What an isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    can_name = kwargs.pop("can_name")
    return PiperBackend(can_name, None, **kwargs)
