"""The ALOHA fake's additions to the Dynamixel bus fake, through the real dynamixel_sdk: shadow motors
linked by Secondary_ID, and the control commands the fake process serves."""

from __future__ import annotations

import time

import pytest

dx = pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is in the `devices` extra")

from armada.drivers.aloha.fake.aloha import AlohaFake  # noqa: E402
from armada.drivers.aloha.fake.dynamixel import GOAL_POSITION, SECONDARY_ID, TORQUE_ENABLE  # noqa: E402


@pytest.fixture
def bus():
    with AlohaFake(leaders=False) as fake:
        port = dx.PortHandler(fake.ports["puppet_left"])
        assert port.openPort()
        yield fake, port, dx.PacketHandler(2.0)
        port.closePort()


def test_a_shadow_executes_writes_to_its_primary_silently(bus):
    fake, port, ph = bus
    f = fake.bus("puppet_left")
    assert f.register(3, SECONDARY_ID) == 2 and f.register(5, SECONDARY_ID) == 4
    # A unicast write to the shoulder (2) reaches its shadow (3); exactly one status packet comes back.
    result, error = ph.write1ByteTxRx(port, 2, TORQUE_ENABLE, 1)
    assert (result, error) == (dx.COMM_SUCCESS, 0)
    assert port.getBytesAvailable() == 0  # the shadow did not answer too
    assert f.register(3, TORQUE_ENABLE) == 1 and f.register(1, TORQUE_ENABLE) == 0
    # A sync write of the shoulder's goal moves both motors of the joint.
    goal = f.present_position(2) + 100
    sw = dx.GroupSyncWrite(port, ph, GOAL_POSITION, 4)
    sw.addParam(2, list(goal.to_bytes(4, "little")))
    assert sw.txPacket() == dx.COMM_SUCCESS
    time.sleep(0.3)
    assert f.present_position(2) == goal and f.present_position(3) == goal
    assert (3, goal) in f.received_goals
    # The shadow still answers to its own ID (ping, reads of its error status).
    assert ph.ping(port, 3)[1] == dx.COMM_SUCCESS


def test_the_control_commands_and_a_bad_one():
    with AlohaFake() as fake:
        assert fake.command({"op": "set_error", "bus": "puppet_right", "id": 4, "overload": True}) == {}
        assert fake.bus("puppet_right").register(4, 70) == 0x20
        assert fake.command({"op": "torque", "bus": "puppet_right"})["torque"]["4"] == 0
        assert fake.command({"op": "position", "bus": "master_left", "id": 9})["position"] == 1925
        with pytest.raises(KeyError, match="no bus 'puppet_middle'"):
            fake.command({"op": "goals", "bus": "puppet_middle"})
        with pytest.raises(ValueError, match="unknown op 'explode'"):
            fake.command({"op": "explode", "bus": "puppet_left"})
