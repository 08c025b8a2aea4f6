"""AgileX Cobot Magic behind the Backend interface: two puppet PiPers composed as one robot.

The action layout is 14 values: left joints 1-6 (rad), left gripper (m), right joints 1-6, right
gripper, matching ``configs/embodiments/cobot_magic.yaml``. It is a ``CompositeBackend``
(drivers/core/composite.py) of two parts, ``left`` (dofs 0-6) and ``right`` (7-13), each a
``PuppetArm``: a ``PiperBackend`` (unit conversion, connect sequence, fault decoding all live there)
with the watch on its bus for its master. The composite splits, combines, names the arm in every
error and fault, and sends stops to both arms even when one fails; this class adds the master rules
that span both arms and the robot-wide state fields. The whole robot runs in one worker process
(the plugin's ``IsolatedBackend``): one round trip per tick, both SDKs' CAN parsing off the driver's
core.

Masters and puppets. Each master PiPer shares its puppet's CAN bus; configured as a teaching arm it
broadcasts joint/gripper command frames (0x155-0x157, 0x159) and the puppet follows them in
hardware. piper_sdk decodes those frames on the puppet's interface (GetArmJointCtrl /
GetArmGripperCtrl), which is what ``read_masters`` returns for teleop and recording. With
``masters_in_state`` every reading carries them in the state's ``device`` map (the interface teleop
and the recorder read): ``leader`` (14 values, the action's layout and units: rad, gripper m), or
None and ``leader_error`` naming the arm whose master is quiet (no frames for MASTER_STALE_S: off,
not in teaching mode, cable out), and ``leader_follows_in_hardware`` (True with ``follow_masters``:
the puppets obey the masters in hardware, so teleop only watches and the recorder's action is the
leader; the driver refuses every write then).

Each puppet's motors and control mode are checked on every read (``PiperBackend``): a disabled
motor or a puppet out of CAN command mode faults the driver naming the arm; ``recover`` takes both
back, confirmed.

The rule while commanding: a puppet follows every command frame on its bus. If a master is
broadcasting while this backend also commands the puppet, the puppet obeys both, alternately, at
up to 200 Hz each: it jerks between two poses and no safety filter sees it. So unless the backend
was made with ``follow_masters=True`` (teleop/recording, where it never commands):
- ``read()`` reports a fault naming the arm while that arm's master frames are fresh, so the
  driver faults, refuses to arm, and ``clear_fault`` is refused until the master is switched off
  (or out of teaching mode);
- ``write()`` raises a non-transient BackendError in the same case, whoever calls it.
With ``follow_masters=True``, ``write()`` is always refused: the masters move the puppets.

Our own commands: on SocketCAN piper_sdk sends without local loopback, so fresh command frames on
the puppet's bus can only come from a master (or another program on the bus). On the fakes' buses
(``virtual``, ``udp_multicast``) the SDK hears its own commands (see ``drivers.piper.fake.bus``);
frames that match what this backend sent recently are therefore not counted as a master. A torn
read (the SDK thread updates two joints non-atomically) could look foreign once, so a master
counts as present only after several foreign observations within a short window. (Each arm's
watch, ``MasterWatch``, lives in drivers/piper/master.py: a single PiPer with a master uses it too.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
from armada.drivers.core.composite import CompositeBackend, Part
from armada.drivers.piper.backend import N_JOINTS, PiperBackend
from armada.drivers.piper.master import MasterWatch

ARM_DOF = N_JOINTS + 1
SIDES = ("left", "right")


def check_layout(emb) -> None:
    """The embodiment must be 2 x (6 joints + gripper) in this order."""
    dof = getattr(emb, "dof", None)
    if dof != 2 * ARM_DOF:
        raise ValueError(f"Cobot Magic backend needs 14 dofs (left 6 joints + gripper, right 6 joints + gripper), "
                         f"embodiment {getattr(emb, 'name', '?')!r} has {dof}")
    expected = np.array(([False] * N_JOINTS + [True]) * 2)
    if not np.array_equal(emb.gripper_mask(), expected):
        raise ValueError(f"Cobot Magic embodiment {emb.name!r}: groups must be left arm (6 joints), left gripper, "
                         f"right arm (6 joints), right gripper; gripper mask is {emb.gripper_mask().tolist()}")


class PuppetArm(Backend):
    """One puppet PiPer and the watch on its bus for its master: a part of the Cobot Magic.

    Its reading's fault includes a broadcasting master (unless the robot follows its masters), and
    its extras carry what the robot's state needs: ``master`` (a master is broadcasting) and, with
    ``masters_in_state``, the master's pose (``leader``, 7 values, or None and ``leader_error``).
    The rules that span both arms (writes and recovery refused while either master broadcasts) are
    ``CobotMagicBackend``'s, checked once per call for both arms before either is touched.
    """

    def __init__(self, watch: MasterWatch, follow_masters: bool, masters_in_state: bool):
        self.watch = watch
        self.piper = watch.backend
        self.follow_masters = follow_masters
        self.masters_in_state = masters_in_state
        self.piper.on_joint_frame = watch.remember  # before sending, so its echo is recognised as ours

    def connect(self, timeout_s: float) -> None:
        self.piper.close()  # a reconnect: the SDK instance and its buses go first
        self.watch.reset()
        self.piper.connect(timeout_s)

    def close(self) -> None:
        """Never disables the motors: a raised arm must not fall."""
        self.piper.close()

    def read(self) -> Reading:
        r = self.piper.read()
        master = not self.follow_masters and self.watch.master_present()
        # The composite names the arm; the watch's reason names it too, so that prefix goes.
        why_master = self.watch.reason().removeprefix(f"{self.watch.name}: ") if master else None
        extras: dict[str, Any] = {"master": master}
        if self.masters_in_state:
            pose, why = self.watch.pose()
            extras["leader"] = None if pose is None else [float(v) for v in pose]
            if why is not None:
                extras["leader_error"] = why
        return Reading(position=r.position, mono_ns=r.mono_ns, velocity=r.velocity, estopped=r.estopped,
                       fault="; ".join(f for f in (r.fault, why_master) if f) or None, extras=extras)

    def check_writable(self) -> None:
        """Refuse to command this puppet while its master broadcasts (module notes)."""
        if self.watch.master_present():
            raise BackendError(self.watch.reason(), transient=False)

    def write(self, position: np.ndarray) -> None:
        self.piper.write(position)

    def estop(self) -> None:
        self.piper.estop()

    def release_estop(self) -> None:
        self.piper.release_estop()

    def recover(self, timeout_s: float) -> None:
        self.piper.recover(timeout_s)

    def on_fault(self, reason: str) -> None:
        self.piper.on_fault(reason)


class CobotMagicBackend(CompositeBackend):
    def __init__(self, cfg, emb, follow_masters: bool = False):
        """``cfg`` is a ``drivers.cobot_magic.config.CobotMagicBackendConfig``. ``follow_masters``: teleop and
        recording, where the masters move the puppets and this backend only reads (see module notes)."""
        check_layout(emb)
        if cfg.left_can == cfg.right_can:
            raise ValueError(f"Cobot Magic: left_can and right_can are both {cfg.left_can!r}; each puppet has its "
                             "own CAN bus")
        self.cfg = cfg
        self.follow_masters = follow_masters
        self.puppets = [PuppetArm(MasterWatch(side, can, self._piper(can, cfg)), follow_masters, cfg.masters_in_state)
                        for side, can in zip(SIDES, (cfg.left_can, cfg.right_can))]
        super().__init__([Part(side, slice(k * ARM_DOF, (k + 1) * ARM_DOF), arm, label=arm.watch.name)
                          for k, (side, arm) in enumerate(zip(SIDES, self.puppets))],
                         dof=2 * ARM_DOF, name="Cobot Magic")

    @property
    def arms(self) -> list[MasterWatch]:
        """Each arm's master watch (its ``backend`` is the arm's PiperBackend)."""
        return [arm.watch for arm in self.puppets]

    @staticmethod
    def _piper(can: str, cfg) -> PiperBackend:
        return PiperBackend(can, None, bustype=cfg.bustype, speed_pct=cfg.speed_pct, gripper_effort=cfg.gripper_effort,
                            stale_s=cfg.stale_s, allow_reset_on_resume=cfg.allow_reset_on_resume)

    # ------------------------------------------------------------------ i/o

    def merge_extras(self, readings: dict[str, Reading]) -> dict[str, Any]:
        """The robot's state fields: which arms are e-stopped or have a broadcasting master, and
        with ``masters_in_state`` the two masters' pose as one 14-value leader (module notes)."""
        extras: dict[str, Any] = {"estopped_arms": [side for side, r in readings.items() if r.estopped],
                                  "master_arms": [side for side, r in readings.items() if r.extras["master"]]}
        if self.cfg.masters_in_state:
            poses = [r.extras["leader"] for r in readings.values()]
            extras["leader"] = None if any(p is None for p in poses) else [v for p in poses for v in p]
            extras["leader_follows_in_hardware"] = self.follow_masters
            quiet = [f"Cobot Magic {part.title}: {readings[part.name].extras['leader_error']}"
                     for part in self.parts if "leader_error" in readings[part.name].extras]
            if quiet:
                extras["leader_error"] = "; ".join(quiet)
        return extras

    def write(self, position: np.ndarray) -> None:
        """Both halves, unless the masters move the puppets or either master broadcasts: then nothing
        is sent to either arm."""
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (2 * ARM_DOF,) or not np.all(np.isfinite(p)):
            raise BackendError(f"Cobot Magic write needs 14 finite values, got {p!r}", transient=False)
        if self.follow_masters:
            raise BackendError("Cobot Magic backend follows the master arms (teleop/recording): the puppets obey "
                               "their masters, and this backend does not command them", transient=False)
        for arm in self.puppets:
            arm.check_writable()
        super().write(p)

    def read_masters(self) -> np.ndarray | None:
        """The two masters' commanded poses (14 values, action layout, rad and m), or None when either
        master's frames are stale (master off, not in teaching mode, or bus silent)."""
        values = []
        for watch in self.arms:
            pose, _ = watch.pose()
            if pose is None:
                return None
            values.append(pose)
        return np.concatenate(values)

    # ------------------------------------------------------------------ recovery

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: each puppet back in CAN mode with every motor enabled, confirmed, held
        where it stands (``PiperBackend.recover``). Refused, touching neither arm, while a master
        broadcasts (``read`` reports it too, so the driver refuses to clear the fault)."""
        if not self.follow_masters:
            for arm in self.puppets:
                arm.check_writable()
        for watch in self.arms:
            # Off now: its past frames must not count once our anchoring frames make the bus fresh again.
            watch.foreign_seen.clear()
        super().recover(timeout_s)


def build_in_worker(cfg: dict, emb: dict, follow_masters: bool) -> CobotMagicBackend:
    """What an isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    from armada.drivers.cobot_magic.config import CobotMagicBackendConfig
    from armada.runtime.config import EmbodimentConfig

    return CobotMagicBackend(CobotMagicBackendConfig.model_validate(cfg), EmbodimentConfig.model_validate(emb),
                             follow_masters=follow_masters)
