"""The driver's command backlog: bounded, and fair between connections."""

from __future__ import annotations

from armada.drivers.core.process import Backlog


def test_one_flooding_connection_cannot_starve_another():
    backlog = Backlog(per_connection=4, total=64)
    for i in range(100):
        backlog.push(b"flood", [i])
    assert len(backlog) == 4 and backlog.dropped == 96  # beyond its share: dropped and counted
    assert backlog.push(b"operator", ["estop-reset"])
    served = [backlog.pop() for _ in range(5)]
    # The operator waits behind at most one message of the flooder, not behind its whole queue.
    assert [identity for identity, _ in served[:2]] == [b"flood", b"operator"]
    assert backlog.pop() is None and len(backlog) == 0


def test_the_total_is_bounded_however_many_connections():
    backlog = Backlog(per_connection=4, total=64)
    accepted = sum(backlog.push(f"c{i}".encode(), [i]) for i in range(1000))
    assert accepted == 64 and len(backlog) == 64 and backlog.dropped == 936
