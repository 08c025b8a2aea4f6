"""The control lease: TTL from the cell (a client may only shorten it), bound to one connection."""

from __future__ import annotations

import pytest

from armada.drivers.core.driver import Driver, Mode
from armada.drivers.core.lease import LeaseManager
from armada.drivers.mock.arm import MockArm
from armada.runtime.config import load_embodiment
from armada.runtime.protocol import ErrorCode, MessageFactory, ProtocolError

EMB = load_embodiment("mock_arm")
F = MessageFactory()
A, B = b"\x00conn-a", b"\x00conn-b"


def test_a_client_cannot_ask_for_a_longer_ttl_than_the_cell_sets():
    leases = LeaseManager(0.3)
    lease = leases.acquire("greedy", 0, ttl_s=10.0, identity=A)
    assert lease.ttl_ns == int(0.3e9)  # was 10 s: a silent holder kept the arm following its buffer
    assert leases.lapsed(int(0.31e9)) is lease


def test_a_client_may_ask_for_a_shorter_ttl():
    leases = LeaseManager(0.3)
    assert leases.acquire("careful", 0, ttl_s=0.1, identity=A).ttl_ns == int(0.1e9)


def test_the_token_is_refused_from_another_connection_and_not_renewed():
    leases = LeaseManager(0.3)
    token = leases.acquire("policy", 0, identity=A).token
    with pytest.raises(ProtocolError) as err:
        leases.check(token, 1000, identity=B)
    assert err.value.code == ErrorCode.NO_LEASE and "another connection" in err.value.reason
    assert leases.current.expires_ns == int(0.3e9)  # the stolen heartbeat renewed nothing
    with pytest.raises(ProtocolError):
        leases.release(token, 1000, identity=B)
    assert leases.holder == "policy"
    leases.check(token, 1000, identity=A)
    leases.release(token, 2000, identity=A)
    assert leases.holder is None


def test_driver_commands_check_the_connection_of_the_lease():
    d = Driver(EMB, MockArm(EMB.home, time_constant_s=0.0), lease_ttl_s=0.5)
    d.connect(1.0)
    reply = d.handle(F.make("acquire", client="t", ttl_s=9.0), 0, A)
    assert reply["ttl_s"] == pytest.approx(0.5)
    with pytest.raises(ProtocolError) as err:
        d.handle(F.make("arm", lease=reply["lease"]), 0, B)
    assert err.value.code == ErrorCode.NO_LEASE and d.mode == Mode.IDLE
    d.handle(F.make("arm", lease=reply["lease"]), 0, A)
    assert d.mode == Mode.ARMED
