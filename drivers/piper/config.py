"""The cell's ``backend:`` map of a PiPer driver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from armada.runtime.config import StrictModel


class PiperBackendConfig(StrictModel):
    """One AgileX PiPer on a CAN bus, through piper_sdk."""

    kind: Literal["piper"] = "piper"
    # A SocketCAN interface (can0), or, with bustype udp_multicast, the multicast group that
    # `armada fake piper` serves (a fake in its own process); virtual only works in one process.
    can: str
    bustype: Literal["socketcan", "udp_multicast", "virtual"] = "socketcan"
    speed_pct: int = Field(default=50, ge=1, le=100)  # the firmware's MOVE J speed percentage
    gripper_effort: int = Field(default=1000, ge=0, le=5000)  # 0.001 N·m
    stale_s: float = Field(default=0.05, gt=0, le=1)  # feedback older than this is a read error
    # piper_sdk's resume frame is its reset frame, which cuts motor power: refused unless set.
    allow_reset_on_resume: bool = False
    # A master (teaching) arm on this arm's bus (drivers/piper/master.py). follow_master: teleop and
    # recording, where the master moves the arm in hardware and the driver refuses every write.
    # master_in_state: the master's commanded pose in every state message (device["leader"], the
    # arm's units, or None and "leader_error" when the master is quiet). With either set, a master
    # broadcasting while the driver commands (follow_master off) faults the driver.
    follow_master: bool = False
    master_in_state: bool = False


def refuse_virtual_bus(bustype: str) -> None:
    """The vendor SDK runs in a worker process (drivers/core/isolated.py), and python-can's
    ``virtual`` bus only connects buses inside one process: the driver would talk to nobody."""
    if bustype == "virtual":
        raise ValueError("bustype virtual only connects buses inside one process, and the device runs in a "
                         "worker process: use udp_multicast with `armada fake piper`, or socketcan for a real arm")
