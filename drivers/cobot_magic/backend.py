"""AgileX Cobot Magic behind the Backend interface: two puppet PiPers composed as one robot.

The action layout is 14 values: left joints 1-6 (rad), left gripper (m), right joints 1-6, right
gripper, matching ``configs/embodiments/cobot_magic.yaml``. Each arm is a ``PiperBackend`` (unit
conversion, connect sequence, fault decoding all live there); this class splits, combines and
names the arm in every error.

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

import time

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading
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


class CobotMagicBackend(Backend):
    def __init__(self, cfg, emb, follow_masters: bool = False):
        """``cfg`` is a ``drivers.cobot_magic.config.CobotMagicBackendConfig``. ``follow_masters``: teleop and
        recording, where the masters move the puppets and this backend only reads (see module notes)."""
        check_layout(emb)
        if cfg.left_can == cfg.right_can:
            raise ValueError(f"Cobot Magic: left_can and right_can are both {cfg.left_can!r}; each puppet has its "
                             "own CAN bus")
        self.cfg = cfg
        self.follow_masters = follow_masters
        self.arms = [MasterWatch(side, can, self._piper(can, cfg))
                     for side, can in zip(SIDES, (cfg.left_can, cfg.right_can))]
        for arm in self.arms:
            arm.backend.on_joint_frame = arm.remember  # before sending, so its echo is recognised as ours

    @staticmethod
    def _piper(can: str, cfg) -> PiperBackend:
        return PiperBackend(can, None, bustype=cfg.bustype, speed_pct=cfg.speed_pct, gripper_effort=cfg.gripper_effort,
                            stale_s=cfg.stale_s, allow_reset_on_resume=cfg.allow_reset_on_resume)

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        """Connect both puppets within one deadline; if the second fails, the first is closed again."""
        deadline = time.monotonic() + timeout_s
        connected: list[MasterWatch] = []
        try:
            for arm in self.arms:
                self._connect_arm(arm, deadline - time.monotonic())
                connected.append(arm)
        except BackendError:
            for arm in connected:
                arm.backend.close()
            raise

    def _connect_arm(self, arm: MasterWatch, remaining_s: float) -> None:
        if remaining_s <= 0:
            raise BackendError(f"Cobot Magic {arm.name}: no time left of the connect deadline", transient=False)
        arm.backend.close()  # a reconnect: PiperBackend.connect would drop the SDK instance prepared below
        arm.reset()
        try:
            arm.backend.connect(remaining_s)
        except BackendError as exc:
            raise BackendError(f"Cobot Magic {arm.name}: {exc}", transient=False) from None

    def close(self) -> None:
        """Disconnect both. Never disables the motors: a raised arm must not fall."""
        for arm in self.arms:
            arm.backend.close()

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        readings, errors = [], []
        for arm in self.arms:
            try:
                readings.append(arm.backend.read())
            except BackendError as exc:
                errors.append((arm, exc))
        if errors:
            raise BackendError("; ".join(f"Cobot Magic {arm.name}: {exc}" for arm, exc in errors),
                               transient=all(exc.transient for _, exc in errors))
        faults = [f"{arm.name}: {r.fault}" for arm, r in zip(self.arms, readings) if r.fault]
        masters = [] if self.follow_masters else [arm for arm in self.arms if arm.master_present()]
        faults += [arm.reason() for arm in masters]
        velocities = [r.velocity for r in readings]
        extras = {"estopped_arms": [a.side for a, r in zip(self.arms, readings) if r.estopped],
                  "master_arms": [a.side for a in masters]}
        if self.cfg.masters_in_state:
            extras.update(self._leader_extras())
        return Reading(
            position=np.concatenate([r.position for r in readings]),
            mono_ns=min(r.mono_ns for r in readings),  # the older of the two measurements
            velocity=None if any(v is None for v in velocities) else np.concatenate(velocities),
            estopped=any(r.estopped for r in readings),
            fault="; ".join(faults) or None,
            extras=extras,
        )

    def write(self, position: np.ndarray) -> None:
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (2 * ARM_DOF,) or not np.all(np.isfinite(p)):
            raise BackendError(f"Cobot Magic write needs 14 finite values, got {p!r}", transient=False)
        if self.follow_masters:
            raise BackendError("Cobot Magic backend follows the master arms (teleop/recording): the puppets obey "
                               "their masters, and this backend does not command them", transient=False)
        for arm in self.arms:
            if arm.master_present():
                raise BackendError(arm.reason(), transient=False)
        for arm, part in zip(self.arms, (p[:ARM_DOF], p[ARM_DOF:])):
            try:
                arm.backend.write(part)
            except BackendError as exc:
                raise BackendError(f"Cobot Magic {arm.name}: {exc}", exc.transient) from None

    def read_masters(self) -> np.ndarray | None:
        """The two masters' commanded poses (14 values, action layout, rad and m), or None when either
        master's frames are stale (master off, not in teaching mode, or bus silent)."""
        values, _ = self._masters()
        return values

    def _masters(self) -> tuple[np.ndarray | None, str | None]:
        """The masters' poses, or None and why (naming each quiet arm)."""
        values, quiet = [], []
        for arm in self.arms:
            pose, why = arm.pose()
            if pose is None:
                quiet.append(f"Cobot Magic {arm.name}: {why}")
            else:
                values.append(pose)
        if quiet:
            return None, "; ".join(quiet)
        return np.concatenate(values), None

    def _leader_extras(self) -> dict:
        """The state's leader fields (module notes); the masters' poses never fail a read."""
        values, why = self._masters()
        out = {"leader": None if values is None else [float(v) for v in values],
               "leader_follows_in_hardware": self.follow_masters}
        if why is not None:
            out["leader_error"] = why
        return out

    # ------------------------------------------------------------------ stops

    def estop(self) -> None:
        """Stop both puppets; the second is stopped even if the first call fails."""
        self._on_both("e-stop", lambda b: b.estop())

    def release_estop(self) -> None:
        self._on_both("resume", lambda b: b.release_estop())

    def recover(self, timeout_s: float) -> None:
        """Operator-requested: each puppet back in CAN mode with every motor enabled, confirmed, held
        where it stands (``PiperBackend.recover``). A broadcasting master is still reported by
        ``read``, so the driver refuses to clear the fault while one is on."""
        deadline = time.monotonic() + timeout_s
        for arm in self.arms:
            if not self.follow_masters and arm.master_present():
                raise BackendError(arm.reason(), transient=False)
            # Off now: its past frames must not count once our anchoring frames make the bus fresh again.
            arm.foreign_seen.clear()
        for arm in self.arms:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise BackendError("no time left of the recovery deadline", transient=False)
                arm.backend.recover(remaining)
            except BackendError as exc:
                raise BackendError(f"Cobot Magic {arm.name}: {exc}", transient=False) from None

    def _on_both(self, what: str, call) -> None:
        errors = []
        for arm in self.arms:
            try:
                call(arm.backend)
            except Exception as exc:  # noqa: BLE001 (whatever the first arm raised, the second must still stop)
                errors.append(f"{arm.name}: {exc}")
        if errors:
            raise BackendError(f"Cobot Magic {what} failed on {'; '.join(errors)}", transient=False)


def build_in_worker(cfg: dict, emb: dict, follow_masters: bool) -> CobotMagicBackend:
    """What an isolated driver's worker process runs (drivers/core/isolated.py): plain arguments."""
    from armada.drivers.cobot_magic.config import CobotMagicBackendConfig
    from armada.runtime.config import EmbodimentConfig

    return CobotMagicBackend(CobotMagicBackendConfig.model_validate(cfg), EmbodimentConfig.model_validate(emb),
                             follow_masters=follow_masters)
