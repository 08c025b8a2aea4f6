"""Backends built inside an isolated worker process by tests/hil/test_isolated.py."""

from __future__ import annotations

import numpy as np

from armada.drivers.core.backend import BackendError
from armada.drivers.mock.arm import MockArm


class PickyArm(MockArm):
    """A mock arm that refuses targets beyond ``refuse_above`` on joint 0, as a device might."""

    def __init__(self, home: list[float], refuse_above: float):
        super().__init__(np.asarray(home, dtype=np.float64))
        self.refuse_above = refuse_above
        self.recovered = 0

    def write(self, position: np.ndarray) -> None:
        if position[0] > self.refuse_above:
            raise BackendError(f"target {position[0]:.2f} refused by the device", transient=False)
        super().write(position)

    def read(self):
        r = super().read()
        return type(r)(position=r.position, mono_ns=r.mono_ns, velocity=r.velocity,
                       extras={"recovered": self.recovered})

    def recover(self, timeout_s: float) -> None:
        self.recovered += 1


def picky_arm(home: list[float], refuse_above: float) -> PickyArm:
    return PickyArm(home, refuse_above)
