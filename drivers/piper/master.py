"""A PiPer master (teaching) arm on its puppet's CAN bus: seen, told apart from our own commands, and
read as the leader; and ``PiperWithMaster``, one PiPer driven under the rules the Cobot Magic keeps
for each of its arms (drivers/cobot_magic/backend.py, which composes two of these watches).

A master configured as teaching arm broadcasts joint/gripper command frames (0x155-0x157, 0x159) on
the bus it shares with its puppet, and the puppet follows them in hardware. piper_sdk on the
puppet's interface decodes them (GetArmJointCtrl / GetArmGripperCtrl).

The rules:
- a broadcasting master while the driver commands: the puppet would obey both, alternately, at up
  to 200 Hz each (a jerk no safety filter sees). So, unless the backend follows the master, a fresh
  master is a fault (``read``) and every write is refused;
- ``follow_master`` (teleop/recording): the master moves the puppet, the driver only reads, every
  write is refused, and the state says ``leader_follows_in_hardware``;
- ``master_in_state``: every reading carries ``device["leader"]`` = the master's commanded pose in
  the puppet's action units (6 joints rad, corrected by the puppet's zero offsets so that leader and
  measured agree on one pose; gripper m), or None and ``leader_error`` when the master is quiet for
  MASTER_STALE_S (off, out of teaching mode, cable out).

Our own commands: on SocketCAN piper_sdk sends without local loopback; on the fakes' buses
(``virtual``, ``udp_multicast``) the SDK hears its own commands. Frames that match what this backend
sent recently are not a master's; a torn read could look foreign once, so a master counts as
present only after several foreign observations within a short window.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.piper.backend import MDEG_PER_RAD, UM_PER_M, PiperBackend

MASTER_STALE_S = 0.1  # master frames older than this: the master is off (it sends at ~200 Hz)
MASTER_CONFIRM_COUNT = 3  # foreign command observations within MASTER_CONFIRM_S mean a master is on
MASTER_CONFIRM_S = 0.1
OWN_HISTORY = 64  # writes remembered per arm (0.3 s at 200 Hz) to recognise our own echoed frames


def fresh(stamp: float, max_age_s: float) -> bool:
    return stamp > 0 and time.time() - stamp <= max_age_s


@dataclass
class MasterWatch:
    """One puppet's bus, watched for its master's command frames."""

    side: str  # "left"/"right" on a Cobot Magic, "arm" for a single PiPer
    can: str
    backend: PiperBackend
    label: str = ""  # how errors name the arm
    sent: deque = field(default_factory=lambda: deque(maxlen=OWN_HISTORY * 3))  # (pair, a, b), 0.001 deg
    foreign_seen: deque = field(default_factory=lambda: deque(maxlen=MASTER_CONFIRM_COUNT))  # monotonic s

    @property
    def name(self) -> str:
        return self.label or f"{self.side} arm ({self.can})"

    def reset(self) -> None:
        self.sent.clear()
        self.foreign_seen.clear()

    def remember(self, mdeg: list[int]) -> None:
        """Every joint frame the backend sends (targets and its anchoring at the measured pose), as
        sent, so its echo matches exactly."""
        self.sent.extend((k, int(mdeg[2 * k]), int(mdeg[2 * k + 1])) for k in range(3))

    def joint_ctrl(self):
        """The last joint command frames heard on this arm's bus (SDK object), or None if stale."""
        ctrl = self.backend.sdk.GetArmJointCtrl()
        return ctrl if fresh(ctrl.time_stamp, MASTER_STALE_S) else None

    def is_own(self, ctrl) -> bool:
        jc = ctrl.joint_ctrl
        pairs = ((0, jc.joint_1, jc.joint_2), (1, jc.joint_3, jc.joint_4), (2, jc.joint_5, jc.joint_6))
        return all(p in self.sent for p in pairs)

    def master_present(self) -> bool:
        """Fresh command frames that this backend did not send, seen repeatedly just now."""
        ctrl = self.joint_ctrl()
        now = time.monotonic()
        if ctrl is not None and not self.is_own(ctrl):
            self.foreign_seen.append(now)
        seen = self.foreign_seen
        return (ctrl is not None and len(seen) == MASTER_CONFIRM_COUNT and now - seen[0] <= MASTER_CONFIRM_S)

    def pose(self) -> tuple[np.ndarray | None, str | None]:
        """The master's last commanded pose in the puppet's action units (6 joints rad, gripper m),
        or None and why."""
        sdk = self.backend.sdk
        ctrl, grip = sdk.GetArmJointCtrl(), sdk.GetArmGripperCtrl()
        stamp = min(ctrl.time_stamp, grip.time_stamp)
        if not fresh(stamp, MASTER_STALE_S):
            age = "none heard" if stamp <= 0 else f"the last {(time.time() - stamp) * 1e3:.0f} ms ago"
            return None, (f"no master command frames ({age}, bound {MASTER_STALE_S * 1e3:.0f} ms): is the master arm "
                          "on, in teaching mode, on this CAN bus?")
        if self.is_own(ctrl):
            return None, "the command frames on the bus are this driver's own, not a master's"
        jc = ctrl.joint_ctrl
        q = np.array([jc.joint_1, jc.joint_2, jc.joint_3, jc.joint_4, jc.joint_5, jc.joint_6], dtype=np.float64)
        # The puppet follows the master's raw targets; its readings are corrected by its zero offsets.
        return np.append(q / MDEG_PER_RAD - self.backend.zero_offsets, grip.gripper_ctrl.grippers_angle / UM_PER_M), None

    def reason(self) -> str:
        return (f"{self.name}: its master arm is broadcasting joint commands (teaching mode), so the puppet would "
                "follow both the master and this driver; switch the master off or out of teaching mode "
                "(or use teleop to record with it)")


class PiperWithMaster(Backend):
    """One PiPer with a master arm on its bus (module notes): the Cobot Magic's rules for one arm."""

    def __init__(self, piper: PiperBackend, follow_master: bool = False, master_in_state: bool = False):
        self.piper = piper
        self.follow_master = follow_master
        self.master_in_state = master_in_state
        self.watch = MasterWatch("arm", piper.can_name, piper, label=f"PiPer on {piper.can_name}")
        piper.on_joint_frame = self.watch.remember  # before sending, so its echo is recognised as ours

    def connect(self, timeout_s: float) -> None:
        self.watch.reset()
        self.piper.connect(timeout_s)

    def close(self) -> None:
        self.piper.close()

    def read(self) -> Reading:
        r = self.piper.read()
        master = not self.follow_master and self.watch.master_present()
        fault = "; ".join(f for f in (r.fault, self.watch.reason() if master else None) if f) or None
        extras: dict[str, Any] = dict(r.extras or {}, master_arms=["arm"] if master else [])
        if self.master_in_state:
            pose, why = self.watch.pose()
            extras.update(leader=None if pose is None else [float(v) for v in pose],
                          leader_follows_in_hardware=self.follow_master)
            if why is not None:
                extras["leader_error"] = f"{self.watch.name}: {why}"
        return Reading(position=r.position, mono_ns=r.mono_ns, velocity=r.velocity, estopped=r.estopped, fault=fault,
                       extras=extras)

    def write(self, position: np.ndarray) -> None:
        if self.follow_master:
            raise BackendError(f"{self.watch.name} follows its master arm (teleop/recording): the arm obeys its "
                               "master, and this backend does not command it", transient=False)
        if self.watch.master_present():
            raise BackendError(self.watch.reason(), transient=False)
        self.piper.write(position)

    def estop(self) -> None:
        self.piper.estop()

    def release_estop(self) -> None:
        self.piper.release_estop()

    def recover(self, timeout_s: float) -> None:
        if not self.follow_master and self.watch.master_present():
            raise BackendError(self.watch.reason(), transient=False)
        self.watch.foreign_seen.clear()  # off now: its past frames must not count once ours make the bus fresh
        self.piper.recover(timeout_s)


def build_in_worker(follow_master: bool = False, master_in_state: bool = False, **kwargs) -> PiperWithMaster:
    """What an isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    can_name = kwargs.pop("can_name")
    return PiperWithMaster(PiperBackend(can_name, None, **kwargs), follow_master=follow_master,
                           master_in_state=master_in_state)
