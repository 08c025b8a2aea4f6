"""Several device backends driven as one robot: each part owns some dofs of the robot's action layout.

A dual-arm robot on a lift and a mobile base (ARX Lift 2) or two PiPers (Cobot Magic) is several
devices, each with its own SDK and bus, but one driver: one action vector, one safety filter, one
lease, one state. ``CompositeBackend`` is the single Backend the driver sees. Each ``Part`` names a
device backend and the indices of its values in the action layout; a part whose SDK must be kept out
of the driver process is an ``IsolatedBackend`` (drivers/core/isolated.py) like any other backend.

The rules, so that one device's trouble is the whole robot's, seen once and coherently:
- ``read``: every part is read; positions (and velocities, when every part has them) are put at
  their indices; ``mono_ns`` is the oldest part's (the reading is as old as its oldest piece);
  ``estopped`` if any part is; ``fault`` joins every part's fault, each named by its part
  ("left_arm: ..."), so the driver faults once, for the robot. A part that raises makes the read
  raise, naming the part; the error is transient only if every failing part's was.
- ``write``: split by indices and written to every part, even when an earlier part fails (the
  others keep receiving their targets this tick: no part is left without a command because its
  neighbour failed); then the failures are raised, naming the parts. A bad vector (wrong shape, not
  finite) is refused before anything is written.
- ``estop``, ``release_estop``, ``on_fault``, ``close``: every part, even when an earlier one raises;
  the failures are then raised as one error naming each part. (``close`` is each part's own close,
  which never cuts torque.)
- ``connect``: every part within one deadline; if one fails, the parts already open are closed
  again (and the failing one too, in case it is half open) and the error names the part.
- ``recover``: every part within one deadline; failures named, as for the stops.
Any exception a part raises that is not a BackendError (an SDK's own) becomes a non-transient
BackendError naming the part: the driver loop only catches BackendError.

``extras`` are namespaced by part by default ({"left_arm": {...}, "base": {...}}); a robot whose
state has robot-wide fields (the Cobot Magic's 14-value ``leader``) overrides ``merge_extras``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from armada.drivers.core.backend import Backend, BackendError, Reading

log = logging.getLogger("armada.composite")


@dataclass(frozen=True)
class Part:
    """One device of a composite robot.

    ``dofs``: where its values sit in the robot's action layout, as a slice (``slice(0, 7)``) or a
    list of indices, in the order the part's backend reads and writes them. ``label``: how errors
    and faults name it (default ``name``).
    """

    name: str
    dofs: slice | Sequence[int]
    backend: Backend
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name


class CompositeBackend(Backend):
    def __init__(self, parts: Sequence[Part], dof: int | None = None, name: str = ""):
        """``dof``: the robot's action size (default: the highest index + 1). Every index in
        ``range(dof)`` must belong to exactly one part. ``name`` prefixes error messages
        ("Cobot Magic left arm (can0): ...")."""
        if not parts:
            raise ValueError("a composite backend needs at least one part")
        names = [p.name for p in parts]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"composite parts need distinct, non-empty names, got {names}")
        resolved = [_indices(p) for p in parts]
        if dof is None:  # the highest index + 1: a gap is then reported as a dof of no part
            total = 1 + max((int(idx.max()) for idx in resolved if len(idx)), default=-1)
        else:
            total = int(dof)
        owner = np.full(total, -1)
        for k, (p, idx) in enumerate(zip(parts, resolved)):
            if len(idx) == 0:
                raise ValueError(f"composite part {p.name!r} has no dofs")
            if idx.min() < 0 or idx.max() >= total:
                raise ValueError(f"composite part {p.name!r}: dofs {idx.tolist()} outside the robot's 0..{total - 1}")
            if len(set(idx.tolist())) != len(idx):
                raise ValueError(f"composite part {p.name!r}: dofs {idx.tolist()} repeat an index")
            taken = owner[idx] >= 0
            if taken.any():
                other = parts[int(owner[idx][taken][0])].name
                raise ValueError(f"composite parts {other!r} and {p.name!r} both claim dofs {idx[taken].tolist()}")
            owner[idx] = k
        if (owner < 0).any():
            raise ValueError(f"composite backend: dofs {np.flatnonzero(owner < 0).tolist()} belong to no part")
        self.parts: tuple[Part, ...] = tuple(parts)
        self.indices: tuple[np.ndarray, ...] = tuple(resolved)  # each part's dofs, as an index array
        self.dof = total
        self.name = name

    def _named(self, part: Part, what: Any) -> str:
        return f"{self.name} {part.title}: {what}" if self.name else f"{part.title}: {what}"

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no part {name!r}; parts: {[p.name for p in self.parts]}")

    # ------------------------------------------------------------------ lifecycle

    def connect(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        opened: list[Part] = []
        for p in self.parts:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise BackendError("no time left of the connect deadline", transient=False)
                p.backend.connect(remaining)
            except Exception as exc:  # noqa: BLE001 (whatever it raised, the open parts must be closed)
                for q in reversed([*opened, p]):
                    try:
                        q.backend.close()
                    except Exception as close_exc:  # noqa: BLE001 (the connect error is the one to report)
                        log.warning("%s", self._named(q, f"closing after a failed connect: {close_exc}"))
                raise BackendError(self._named(p, _message(exc)), transient=False) from None
            opened.append(p)

    def close(self) -> None:
        """Every part's own close (which never cuts torque), even if one fails."""
        self._on_all("close", lambda b: b.close())

    # ------------------------------------------------------------------ i/o

    def read(self) -> Reading:
        readings: list[Reading] = []
        errors: list[tuple[Part, BackendError]] = []
        for p, idx in zip(self.parts, self.indices):
            try:
                r = p.backend.read()
                shape = np.shape(r.position)
                if shape != (len(idx),):
                    raise BackendError(f"read {shape} values, its part of the robot has {len(idx)}",
                                       transient=False)
                if r.velocity is not None and np.shape(r.velocity) != shape:
                    raise BackendError(f"read {np.shape(r.velocity)} velocities for {shape} positions",
                                       transient=False)
                readings.append(r)
            except BackendError as exc:
                errors.append((p, exc))
            except Exception as exc:  # noqa: BLE001 (an SDK's own exception: a device error like any other)
                errors.append((p, BackendError(_message(exc), transient=False)))
        if errors:
            raise BackendError("; ".join(self._named(p, exc) for p, exc in errors),
                               transient=all(exc.transient for _, exc in errors))
        position = np.empty(self.dof)
        velocity: np.ndarray | None = np.empty(self.dof)
        for idx, r in zip(self.indices, readings):
            position[idx] = r.position
            if r.velocity is None:
                velocity = None
            elif velocity is not None:
                velocity[idx] = r.velocity
        faults = [f"{p.title}: {r.fault}" for p, r in zip(self.parts, readings) if r.fault]
        return Reading(position=position, mono_ns=min(r.mono_ns for r in readings), velocity=velocity,
                       estopped=any(r.estopped for r in readings), fault="; ".join(faults) or None,
                       extras=self.merge_extras(dict(zip((p.name for p in self.parts), readings))))

    def merge_extras(self, readings: dict[str, Reading]) -> dict[str, Any] | None:
        """The state's device map: each part's extras under its name (none: None)."""
        out = {name: r.extras for name, r in readings.items() if r.extras}
        return out or None

    def write(self, position: np.ndarray) -> None:
        p = np.asarray(position, dtype=np.float64)
        if p.shape != (self.dof,) or not np.all(np.isfinite(p)):
            raise BackendError(f"{self.name or 'composite'} write needs {self.dof} finite values, got {p!r}",
                               transient=False)
        errors: list[tuple[Part, BackendError]] = []
        for part, idx in zip(self.parts, self.indices):
            try:
                part.backend.write(p[idx])
            except BackendError as exc:
                errors.append((part, exc))
            except Exception as exc:  # noqa: BLE001 (the next part still gets its target)
                errors.append((part, BackendError(_message(exc), transient=False)))
        if errors:
            raise BackendError("; ".join(self._named(q, exc) for q, exc in errors),
                               transient=all(exc.transient for _, exc in errors))

    # ------------------------------------------------------------------ stops and recovery

    def estop(self) -> None:
        """Stop every part; each is stopped even if an earlier one fails."""
        self._on_all("e-stop", lambda b: b.estop())

    def release_estop(self) -> None:
        self._on_all("resume", lambda b: b.release_estop())

    def on_fault(self, reason: str) -> None:
        """Every part hears of the fault (nothing may recover or resend on its own), even if one raises."""
        self._on_all("stopping after the fault", lambda b: b.on_fault(reason))

    def recover(self, timeout_s: float) -> None:
        """Every part within one deadline (operator-requested); failures named by part."""
        deadline = time.monotonic() + timeout_s

        def recover(b: Backend) -> None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendError("no time left of the recovery deadline", transient=False)
            b.recover(remaining)

        self._on_all("recover", recover)

    def _on_all(self, what: str, call: Callable[[Backend], None]) -> None:
        errors = []
        for p in self.parts:
            try:
                call(p.backend)
            except Exception as exc:  # noqa: BLE001 (whatever one part raised, the next must still get the call)
                errors.append(f"{p.title}: {_message(exc)}")
        if errors:
            prefix = f"{self.name} " if self.name else ""
            raise BackendError(f"{prefix}{what} failed on {'; '.join(errors)}", transient=False)


def _indices(part: Part) -> np.ndarray:
    dofs = part.dofs
    if isinstance(dofs, slice):
        start, stop, step = dofs.start or 0, dofs.stop, dofs.step or 1
        if stop is None or start < 0 or stop < 0 or step <= 0:
            raise ValueError(f"composite part {part.name!r}: a slice of dofs needs a start >= 0, an end and a "
                             f"positive step, got {dofs}")
        return np.arange(start, stop, step, dtype=np.intp)
    idx = np.asarray(list(dofs))
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"composite part {part.name!r}: dofs must be a slice or a list of indices, got {dofs!r}")
    return idx.astype(np.intp)


def _message(exc: BaseException) -> str:
    """A BackendError's own text; another exception's type too (an SDK's RuntimeError, ...)."""
    return str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
