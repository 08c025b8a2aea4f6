"""One ARX arm through ``arx5_interface`` (arx5-sdk 0.1.5, the registry's cp312 wheel).

Written against the wheel's own signatures (its .pyi stubs and pybind docstrings):
``Arx5JointController(model: str, interface_name: str)``, ``get_joint_state() -> JointState``
(``pos()``, ``vel()``, ``torque()``, ``gripper_pos``, ``gripper_vel``, ``gripper_torque``,
``timestamp``), ``set_joint_cmd(JointState(pos, vel, torque, gripper_pos))``, ``get_gain()`` /
``set_gain(Gain(kp, kd, gripper_kp, gripper_kd))``, ``get_controller_config()`` (``default_kp``,
``default_kd``, ``default_gripper_kp``, ``default_gripper_kd``). None of these calls has run
against an arm: there is no SocketCAN here (docs/arx-lift2.md lists them as untested on hardware).

What arx5-sdk does that matters here (read from its source, src/app/controller_base.cpp):
- the constructor opens the bus (RuntimeError "Failed to open USB-CAN adapter ..." at once when
  the interface does not exist; "None of the motors are initialized" when no motor answers),
  enables the motors and starts in damping (kp = 0, command = the measured pose), with its own
  background thread sending at 500 Hz;
- ``set_gain`` raises when kp goes from zero to non-zero while the command is > 0.2 rad from the
  measured pose, so ``hold`` is only called right after ``command(measured)``;
- a ``JointState`` with timestamp 0 is applied at once (the interpolator is reset to it);
- its emergency state (over-current, an impossible reading) is damping forever, until the process
  ends; the destructor puts an X5 into damping for 2 s and stops sending (forced for X5).
The SDK is imported when the adapter opens, so nothing else depends on it.
"""

from __future__ import annotations

import numpy as np

from armada.drivers.arx_lift2.adapter import ARM_JOINTS, AdapterError, ArmSample


class Arx5Arm:
    def __init__(self, model: str, can: str):
        self.model, self.can = model, can
        self._sdk = None  # the arx5_interface module, once opened
        self._ctrl = None  # Arx5JointController

    def open(self) -> None:
        if self._ctrl is not None:  # reconnect: the SDK's thread is still holding; a second controller would fight it
            return
        try:
            import arx5_interface
        except ImportError as exc:
            raise AdapterError(f"arx5_interface is not installed ({exc}): pip install arx5-interface") from None
        try:
            ctrl = arx5_interface.Arx5JointController(self.model, self.can)
        except Exception as exc:  # noqa: BLE001 (pybind11 turns the SDK's std::runtime_error into RuntimeError)
            raise AdapterError(f"arx5-sdk {self.model} on {self.can}: {exc} (arm powered? CAN up?)") from None
        self._sdk, self._ctrl = arx5_interface, ctrl

    def _controller(self):
        if self._ctrl is None:
            raise AdapterError(f"ARX arm on {self.can} is not open")
        return self._ctrl

    def read(self) -> ArmSample:
        ctrl = self._controller()
        js = ctrl.get_joint_state()
        gain = ctrl.get_gain()
        return ArmSample(pos=np.array(js.pos(), dtype=np.float64), vel=np.array(js.vel(), dtype=np.float64),
                         torque=np.array(js.torque(), dtype=np.float64), gripper_pos=float(js.gripper_pos),
                         gripper_vel=float(js.gripper_vel), gripper_torque=float(js.gripper_torque),
                         timestamp=float(js.timestamp), damping=not np.any(np.asarray(gain.kp())))

    def command(self, pos: np.ndarray, gripper_pos: float) -> None:
        ctrl = self._controller()
        zeros = np.zeros(ARM_JOINTS)
        cmd = self._sdk.JointState(np.asarray(pos, dtype=np.float64), zeros, zeros, float(gripper_pos))
        cmd.timestamp = 0.0  # applied at once
        ctrl.set_joint_cmd(cmd)

    def hold(self) -> None:
        ctrl = self._controller()
        cfg = ctrl.get_controller_config()
        try:
            ctrl.set_gain(self._sdk.Gain(np.asarray(cfg.default_kp), np.asarray(cfg.default_kd),
                                         float(cfg.default_gripper_kp), float(cfg.default_gripper_kd)))
        except Exception as exc:  # noqa: BLE001 (the SDK refuses kp while the command is far from the pose)
            raise AdapterError(f"arx5-sdk on {self.can}: position gains refused: {exc}") from None

    def close(self) -> None:
        """Keeps the controller: its thread holds the arm until the process ends (module notes)."""
