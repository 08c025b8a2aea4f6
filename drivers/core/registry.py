"""Devices are plugins: the driver core, the config loader and the CLI look a backend up by its
``kind`` and never name a device.

Each device folder (drivers/<device>/plugin.py) exposes one ``BackendPlugin`` and registers it
under the ``armada.backends`` entry-point group in pyproject.toml, the way ros2_control loads
hardware interfaces by name; a lab ships its own robot the same way, from its own package.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

    from armada.drivers.core.backend import Backend
    from armada.runtime.config import DriverConfig, EmbodimentConfig

ENTRY_POINT_GROUP = "armada.backends"
T = TypeVar("T")
log = logging.getLogger("armada.registry")


@dataclass(frozen=True)
class BuildContext:
    """What a factory gets to build one driver's backend."""

    driver: "DriverConfig"  # ``driver.backend`` is an instance of the plugin's ``config_model``
    embodiment: "EmbodimentConfig"
    cell_dir: Path | None  # the cell file's folder: relative paths (calibration files) resolve here


@dataclass(frozen=True)
class BackendPlugin:
    kind: str  # the ``backend.kind`` a cell names
    # Pydantic model of the cell's ``backend:`` map (extra keys forbidden, ``kind`` included).
    config_model: "type[BaseModel]"
    # Builds the backend; imports the vendor SDK lazily (the driver process imports only its own).
    build: "Callable[[BuildContext], Backend]"
    # False only for mocks and simulators: decides whether `armada run` may arm without --arm.
    moves_hardware: bool
    # Run when the cell loads: raise ValueError (dof, joint names, ...) so a mismatch fails at
    # load naming the driver, not at driver start.
    check_embodiment: "Callable[[Any, EmbodimentConfig], None] | None" = None
    # The `armada calibrate joints` kind whose files this backend applies, if any.
    joint_calibration_kind: str | None = None
    # `armada fake KIND ARGS...`: a protocol-level fake of the device; returns an exit code.
    fake: "Callable[[list[str]], int] | None" = None
    # `armada bench KIND`: the real SDK against the fake; returns a dict of results to print.
    bench: "Callable[[float], dict[str, Any]] | None" = None
    # `armada doctor`: the devices this backend's config names (a list of
    # armada.runtime.doctor.checks.DeviceNeed); None: the doctor reads the usual fields (port, can, host).
    devices: "Callable[[Any], list[Any]] | None" = None


class RegistryError(LookupError):
    """A kind nobody registered; the message lists the known kinds and any plugin that failed to load."""


class PluginRegistry(Generic[T]):
    """Plugins of one entry-point group, loaded on first use.

    A plugin whose entry point fails to import (a missing dependency, a typo) is remembered with
    its error and reported whenever a lookup fails or the kinds are listed; it never hides the
    plugins that did load. ``extra`` adds plugins for the duration of a ``with`` block only (the
    conformance suite, a test plugin), so nothing registered by one test leaks into the next.
    """

    def __init__(self, group: str, plugin_type: type[T], what: str,
                 entry_points: Callable[[], Iterable[EntryPoint]] | None = None):
        self.group, self.plugin_type, self.what = group, plugin_type, what
        self._entry_points = entry_points or (lambda: importlib.metadata.entry_points(group=group))
        self._loaded: dict[str, T] | None = None
        self._broken: dict[str, str] = {}  # entry-point name -> "module:attr: error"
        self._extra: list[dict[str, T]] = []
        self._lock = threading.RLock()  # re-entrant: a plugin's import must not deadlock a lookup

    def _load(self) -> dict[str, T]:
        with self._lock:
            if self._loaded is None:
                loaded: dict[str, T] = {}
                for ep in sorted(self._entry_points(), key=lambda e: e.name):
                    try:
                        plugin = ep.load()
                    except Exception as exc:  # noqa: BLE001 (any import error: report it, keep the others)
                        self._broken[ep.name] = f"entry point {ep.name} = {ep.value!r} failed to load: " \
                                                f"{type(exc).__name__}: {exc}"
                        log.error("%s plugin %s", self.what, self._broken[ep.name])
                        continue
                    if not isinstance(plugin, self.plugin_type):
                        self._broken[ep.name] = (f"entry point {ep.name} = {ep.value!r} is a {type(plugin).__name__}, "
                                                 f"not a {self.plugin_type.__name__}")
                        continue
                    name = _name_of(plugin)
                    if name != ep.name:
                        self._broken[ep.name] = (f"entry point {ep.name} = {ep.value!r} names kind {name!r}; "
                                                 "the entry point's name and the kind must agree")
                        continue
                    if name in loaded:  # two packages claim one kind: refuse to guess which is meant
                        self._broken[ep.name] = (f"entry point {ep.name} = {ep.value!r}: kind {name!r} is "
                                                 "registered twice (two installed packages claim it)")
                        del loaded[name]
                        continue
                    if ep.name in self._broken:
                        continue
                    loaded[name] = plugin
                self._loaded = loaded
            return self._loaded

    def all(self) -> dict[str, T]:
        """Every plugin that loaded, by kind (extras included, innermost last)."""
        out = dict(self._load())
        for extra in self._extra:
            out.update(extra)
        return out

    def kinds(self) -> list[str]:
        return sorted(self.all())

    def broken(self) -> dict[str, str]:
        """Entry points that failed to load: name -> why."""
        self._load()
        return dict(self._broken)

    def get(self, kind: str) -> T:
        plugins = self.all()
        if kind in plugins:
            return plugins[kind]
        if kind in self.broken():
            raise RegistryError(f"{self.what} {kind!r} is registered but its plugin does not load: "
                                f"{self._broken[kind]}")
        known = ", ".join(sorted(plugins)) or "none"
        note = f" (failed to load: {', '.join(sorted(self._broken))})" if self._broken else ""
        raise RegistryError(f"unknown {self.what} {kind!r}; known: {known}{note}")

    @contextlib.contextmanager
    def extra(self, *plugins: T) -> Iterator[None]:
        """Register ``plugins`` for the ``with`` block only; they shadow installed ones of the same kind."""
        for p in plugins:
            if not isinstance(p, self.plugin_type):
                raise TypeError(f"{p!r} is not a {self.plugin_type.__name__}")
        layer = {_name_of(p): p for p in plugins}
        self._extra.append(layer)
        try:
            yield
        finally:
            self._extra.remove(layer)


def _name_of(plugin: Any) -> str:
    """A backend plugin's ``kind``, or the ``name`` of other plugin types."""
    return getattr(plugin, "kind", None) or getattr(plugin, "name")


BACKENDS: PluginRegistry[BackendPlugin] = PluginRegistry(ENTRY_POINT_GROUP, BackendPlugin, "backend kind")


def get(kind: str) -> BackendPlugin:
    """The plugin of a backend kind; RegistryError lists the known kinds."""
    return BACKENDS.get(kind)


def moves_no_hardware(cell: Any) -> bool:
    """Only a cell whose every backend moves nothing real (mocks, simulators) may be armed without
    the operator's --arm (`armada run`, `armada teleop`, `armada record`)."""
    return not any(get(d.backend.kind).moves_hardware for d in cell.drivers)
