"""The control lease: one controller at a time, kept alive by heartbeats, bound to one connection.

A policy and a teleop must never fight over an arm. Whoever holds the lease may arm and move
it; everyone else is refused. A lease lapses when its holder stops talking for ``ttl``; the
driver then decelerates and holds.

The cell sets the TTL (``DriverConfig.lease_ttl_s``): it is how long the arm may follow its buffer
with nobody listening, a safety decision of whoever configured the cell. A client may ask for a
shorter TTL, never a longer one.

The lease is bound to the connection that acquired it (its ZeroMQ ROUTER identity): a token read
off a log, a screen or another process is useless from any other connection. So a client sends
acquire, heartbeats and leased commands over one socket.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from armada.runtime.protocol import ErrorCode, ProtocolError


@dataclass
class Lease:
    token: str
    client: str
    ttl_ns: int
    expires_ns: int
    identity: bytes  # the connection that acquired it


class LeaseManager:
    def __init__(self, ttl_s: float):
        if not ttl_s > 0:
            raise ValueError(f"lease TTL must be > 0 s, got {ttl_s!r}")
        self.ttl_ns = int(ttl_s * 1e9)
        self.current: Lease | None = None

    def acquire(self, client: str, now_ns: int, ttl_s: float | None = None, identity: bytes = b"") -> Lease:
        if self.current is not None and self.current.expires_ns > now_ns:
            raise ProtocolError(ErrorCode.LEASE_HELD,
                                f"the lease is held by {self.current.client[:64]!r}; it must release it or stop "
                                "sending heartbeats first")
        ttl_ns = self.ttl_ns if ttl_s is None else max(1, min(int(ttl_s * 1e9), self.ttl_ns))
        self.current = Lease(secrets.token_hex(8), client, ttl_ns, now_ns + ttl_ns, identity)
        return self.current

    def check(self, token: str, now_ns: int, identity: bytes = b"") -> Lease:
        """Validate a token from this connection and renew its lease; raises NO_LEASE otherwise."""
        lease = self.current
        if lease is None or lease.token != token or lease.expires_ns <= now_ns:
            holder = f"held by {lease.client[:64]!r}" if lease and lease.expires_ns > now_ns else "free"
            raise ProtocolError(ErrorCode.NO_LEASE, f"this command needs the control lease (it is {holder}); "
                                                     "send acquire first")
        if lease.identity != identity:
            raise ProtocolError(ErrorCode.NO_LEASE,
                                f"this lease token was granted to another connection (held by {lease.client[:64]!r}); "
                                "send acquire, heartbeats and commands over the one connection that acquired it")
        lease.expires_ns = now_ns + lease.ttl_ns
        return lease

    def renew_after_wait(self, now_ns: int, identity: bytes) -> bool:
        """Renew the lease of connection ``identity`` when a slow command of its own completes.

        Its holder could not heartbeat on that connection while it waited for the reply, so the
        completion counts as its activity. False (nothing renewed) if the lease lapsed or changed
        hands meanwhile."""
        lease = self.current
        if lease is None or lease.identity != identity or lease.expires_ns <= now_ns:
            return False
        lease.expires_ns = now_ns + lease.ttl_ns
        return True

    def release(self, token: str, now_ns: int, identity: bytes = b"") -> None:
        self.check(token, now_ns, identity)
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
