"""The inference side's lease against a real driver process: one connection carries acquire,
heartbeats and commands (the driver binds the lease to it), and the heartbeats stop, so the
lease lapses within the cell's TTL, as soon as the episode loop stops making progress."""

from __future__ import annotations

import threading
import time

import pytest

from armada.runtime.config import SCRIPTED_CELL
from armada.runtime.inference.link import DriverLink
from armada.runtime.supervisor import CellProcesses
from armada.runtime.transport import RemoteError

pytestmark = pytest.mark.hil


def test_heartbeats_keep_the_real_drivers_lease_only_while_the_loop_makes_progress(short_tmp):
    with CellProcesses(SCRIPTED_CELL, short_tmp) as procs:
        procs.spawn("driver", "arm")
        procs.wait_ready()
        cfg = procs.cell.drivers[0]
        link = DriverLink(procs.ctx, cfg, None)
        try:
            link.handshake()
            link.acquire("test")
            progressing = threading.Event()
            progressing.set()
            link.start_heartbeat(0.05, progressing.is_set)
            time.sleep(1.0)  # three TTLs: only the heartbeats (over the same connection) keep it
            assert link.command("arm")["mode"] == "armed"
            lost_before = link.stats()["counters"]["lease_lost"]
            progressing.clear()  # the episode loop hangs
            stuck_at = time.monotonic()
            time.sleep(cfg.lease_ttl_s + 0.3)
            with pytest.raises(RemoteError, match="no_lease"):
                link.command("disarm")
            assert link.stats()["counters"]["lease_lost"] == lost_before + 1
            assert time.monotonic() - stuck_at < cfg.lease_ttl_s + 1.0
            assert link.heartbeats_withheld > 0 and link.heartbeat_error is None
        finally:
            link.close()
