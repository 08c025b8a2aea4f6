"""This host's CURVE keys for a cell split over hosts (no ZeroMQ import: used by the config loader).

One cell file serves every host; only the keys differ. A host's key set is a folder written by
`armada keys` (its ``curve.yaml`` plus the key files). It is chosen, first match wins, by:

1. ``ARMADA_KEYS=/path/to/folder`` in the process's environment (systemd ``Environment=``, tests);
2. the cell's ``curve: {keys: /path/to/folder}`` (relative to the cell's folder), the same path on
   every host, each holding its own host's folder.

A cell with a full ``curve:`` section and no ``ARMADA_KEYS`` is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import yaml

KEYS_ENV = "ARMADA_KEYS"
_PATH_FIELDS = ("server_public_key", "server_secret_key", "client_secret_key", "authorized_clients")
_MAX_BYTES = 64 * 1024


class HostKeysError(ValueError):
    pass


def apply_host_keys(data: Any, cell_path: Path | str | None, environ: Mapping[str, str]) -> Any:
    """The cell's raw YAML data with ``curve:`` replaced by this host's key set, when one is chosen."""
    folder: Path | None = None
    if environ.get(KEYS_ENV):
        folder = Path(environ[KEYS_ENV])
    elif isinstance(data, dict) and isinstance(data.get("curve"), dict) and set(data["curve"]) == {"keys"}:
        folder = Path(str(data["curve"]["keys"]))
        if not folder.is_absolute() and cell_path is not None:
            folder = Path(cell_path).parent / folder
    if folder is None or not isinstance(data, dict):
        return data
    return {**data, "curve": host_curve(folder)}


def host_curve(folder: Path | str) -> dict[str, Any]:
    """The `curve:` section of a host key folder, its paths made absolute; a clear error when the
    folder is not one written by `armada keys`."""
    folder = Path(folder)
    source = folder / "curve.yaml"
    try:
        text = source.read_bytes()[:_MAX_BYTES + 1]
    except OSError as exc:
        raise HostKeysError(f"{KEYS_ENV}/curve keys {folder}: no readable curve.yaml ({exc.strerror}); "
                            "write one with `armada keys FOLDER --hosts ...` and use its host's folder") from None
    if len(text) > _MAX_BYTES:
        raise HostKeysError(f"{source}: larger than {_MAX_BYTES} bytes")
    section = yaml.safe_load(text)
    if not isinstance(section, dict) or "server_public_key" not in section:
        raise HostKeysError(f"{source}: not a curve section (server_public_key missing)")
    out: dict[str, Any] = dict(section)
    for key in _PATH_FIELDS:
        if section.get(key) is not None:
            out[key] = str(_under(folder, section[key]))
    if isinstance(section.get("server_keys"), dict):
        out["server_keys"] = {str(host): str(_under(folder, p)) for host, p in section["server_keys"].items()}
    return out


def _under(folder: Path, name: Any) -> Path:
    path = Path(str(name))
    return Path(os.path.normpath(path if path.is_absolute() else folder / path))  # no `..` in messages
