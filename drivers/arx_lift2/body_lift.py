"""The lift column and the omni base through ARX LIFT-mini's ``lift_controller`` binding.

Not on any registry: LIFT-mini (github.com/ARXroboticsX/LIFT-mini) ships a prebuilt
``libarx_lift_src.so`` and a pybind11 module built on the robot (``./build.sh``; ``pip install -e .``
installs the ``lift_controller`` package). Written against its binding
(lift_controller/src/lift_control_loop.cpp) and header (interfaces/InterfacesPy.hpp):
``InterfacesPy(bus_name: str, robot_type: RobotType)``, ``set_height(height)`` (m, 0-0.38),
``set_chassis_cmd(v_x, v_y, w_z, mode)`` (mode 1: whole-body velocity, m/s and rad/s),
``get_height() -> float``, ``get_wheel_vel() -> ndarray(4)`` (rad/s), ``get_accel() -> ndarray(3)``,
``loop()`` (one exchange; ARX's examples call it every 2.5 ms). None of it has run here: no
SocketCAN, and the library is not installable (docs/arx-lift2.md lists the calls as untested).

Not used, on purpose: ``protect()`` (undocumented; ARX's older LIFT SDK calls its mode 2
"protect", which may release the motors, and the column falls when its motors lose power, as
ARX's readme warns), ``set_wheel_vel`` (mode 3) and ``mit_joint_control``.
"""

from __future__ import annotations

import numpy as np

from armada.drivers.arx_lift2.adapter import AdapterError, BodySample

CHASSIS_MODE_BODY_VELOCITY = 1  # set_chassis_cmd's mode: "整体速度控制" (whole-body velocity), m/s
ROBOT_TYPES = ("LIFT", "X7S", "X72026", "LIFT2026", "LIFT2026_4310_3519")  # the binding's RobotType values


class LiftMiniBody:
    def __init__(self, bus: str, robot_type: str):
        if robot_type not in ROBOT_TYPES:
            raise ValueError(f"LIFT-mini robot type {robot_type!r} is not one of {ROBOT_TYPES}")
        self.bus, self.robot_type = bus, robot_type
        self._io = None  # InterfacesPy

    def open(self) -> None:
        if self._io is not None:
            return
        try:
            from lift_controller import InterfacesPy, RobotType
        except ImportError as exc:
            raise AdapterError(f"ARX's lift_controller is not installed ({exc}): build LIFT-mini on the robot "
                               "(./build.sh, then pip install -e . in LIFT-mini/)") from None
        try:
            self._io = InterfacesPy(self.bus, getattr(RobotType, self.robot_type))
        except Exception as exc:  # noqa: BLE001 (whatever the binding raises for a missing bus)
            raise AdapterError(f"LIFT-mini on {self.bus}: {exc} (body powered? CAN up?)") from None

    def _interface(self):
        if self._io is None:
            raise AdapterError(f"LIFT-mini on {self.bus} is not open")
        return self._io

    def set_height(self, height_m: float) -> None:
        self._interface().set_height(float(height_m))

    def set_chassis(self, vx: float, vy: float, wz: float) -> None:
        self._interface().set_chassis_cmd(float(vx), float(vy), float(wz), CHASSIS_MODE_BODY_VELOCITY)

    def spin(self) -> None:
        self._interface().loop()

    def read(self) -> BodySample:
        io = self._interface()
        return BodySample(height=float(io.get_height()), wheel_vel=np.array(io.get_wheel_vel(), dtype=np.float64),
                          accel=np.array(io.get_accel(), dtype=np.float64))

    def close(self) -> None:
        """Keeps the interface: destroying it may release the motors (module notes)."""
