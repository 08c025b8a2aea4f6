"""Which CPUs each process of a cell may run on.

A driver may name its own CPUs (``cpus:`` in the cell). Its process is pinned to them, and every
other process of the cell (cameras, inference, the other drivers) is kept off them, so that what
the robot's control loop shares its cores with is only what the driver itself runs. On a 2-core
VM this took the SCHED_FIFO loop's start lateness p99 from 0.15-0.35 ms to 0.04 ms under an
episode (docs/benchmarks.md). It does not keep the rest of the system off those cores: for that,
boot with isolcpus= (`armada doctor` says whether the driver's CPUs are; `armada systemd` gives
the driver's unit their CPUAffinity=).
"""

from __future__ import annotations

import logging
import os

from armada.runtime.config import CellConfig

log = logging.getLogger("armada.cpus")


class CpuPlacementError(ValueError):
    """A cell's CPUs that this machine cannot give."""


def reserved_cpus(cell: CellConfig) -> set[int]:
    """The CPUs the cell's drivers keep for themselves."""
    return {c for d in cell.drivers for c in (d.cpus or [])}


def cpus_for(cell: CellConfig, role: str, name: str | None, available: set[int] | None = None) -> set[int] | None:
    """The CPUs process ``role``/``name`` should run on; None: leave it where it is."""
    available = set(os.sched_getaffinity(0)) if available is None else available
    if role == "driver":
        own = next((d.cpus for d in cell.drivers if d.name == name), None)
        if own:
            missing = sorted(set(own) - available)
            if missing:
                raise CpuPlacementError(f"driver {name}: cpus {own} include {missing}, which this process may not "
                                        f"use (it may use {sorted(available)})")
            return set(own)
    reserved = reserved_cpus(cell)
    if not reserved:
        return None
    rest = available - reserved
    if not rest:
        log.warning("%s: the drivers reserve every CPU this process may use (%s); it shares them",
                    name or role, sorted(available))
        return None
    return rest


def apply_cpus(cell: CellConfig, role: str, name: str | None) -> None:
    """Pin this process as ``cpus_for`` says: every thread it has (imports start some, e.g. a BLAS
    pool) and, by inheritance, every thread it starts later."""
    cpus = cpus_for(cell, role, name)
    if cpus is None:
        return
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile
    log.info("%s runs on CPU %s", name or role, ",".join(map(str, sorted(cpus))))


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: the calling thread only
        return [0]
