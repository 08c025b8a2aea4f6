"""The control lease: one controller at a time, kept alive by heartbeats.

A policy and a teleop must never fight over an arm. Whoever holds the lease may arm and move
it; everyone else is refused. A lease lapses when its holder stops talking for ``ttl``; the
driver then decelerates and holds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from runtime.protocol import ErrorCode, ProtocolError


@dataclass
class Lease:
    token: str
    client: str
    ttl_ns: int
    expires_ns: int


class LeaseManager:
    def __init__(self, default_ttl_s: float):
        self.default_ttl_ns = int(default_ttl_s * 1e9)
        self.current: Lease | None = None

    def acquire(self, client: str, now_ns: int, ttl_s: float | None = None) -> Lease:
        if self.current is not None and self.current.expires_ns > now_ns:
            raise ProtocolError(ErrorCode.LEASE_HELD,
                                f"the lease is held by {self.current.client!r}; it must release it or stop "
                                "sending heartbeats first")
        ttl_ns = self.default_ttl_ns if ttl_s is None else int(min(ttl_s, 10.0) * 1e9)
        self.current = Lease(secrets.token_hex(8), client, ttl_ns, now_ns + ttl_ns)
        return self.current

    def check(self, token: str, now_ns: int) -> Lease:
        """Validate a token and renew its lease; raises NO_LEASE otherwise."""
        lease = self.current
        if lease is None or lease.token != token or lease.expires_ns <= now_ns:
            holder = f"held by {lease.client!r}" if lease and lease.expires_ns > now_ns else "free"
            raise ProtocolError(ErrorCode.NO_LEASE, f"this command needs the control lease (it is {holder}); "
                                                     "send acquire first")
        lease.expires_ns = now_ns + lease.ttl_ns
        return lease

    def release(self, token: str, now_ns: int) -> None:
        self.check(token, now_ns)
        self.current = None

    def lapsed(self, now_ns: int) -> Lease | None:
        """If the holder's lease has just expired, forget it and return it (once)."""
        lease = self.current
        if lease is not None and lease.expires_ns <= now_ns:
            self.current = None
            return lease
        return None

    @property
    def holder(self) -> str | None:
        return self.current.client if self.current else None
