"""`armada keys`: one CURVE key pair per host of a cell, and each host's allow-list.

``armada keys FOLDER --hosts robot=10.0.0.2,gpu=10.0.0.3`` writes, for each host, a folder to copy
to that host (and only that one: it holds its secret key)::

    FOLDER/robot/            0700
      robot.key_secret       0600  this host's key pair (servers bind with it, clients connect with it)
      robot.key                    its public half
      allowed/robot.key ...        the allow-list: public keys of the hosts that may connect here
      servers/gpu.key ...          public keys of the hosts this one connects to
      curve.yaml                   the cell's `curve:` section for this host (paths relative to here)

A host's processes pick their keys with ``ARMADA_KEYS=/path/to/FOLDER/robot`` in their environment,
or a cell that says ``curve: {keys: /etc/armada/keys}`` with each host's folder copied there (see
runtime/remote/hostkeys.py and docs/remote.md). With addresses (``name=address``), ``curve.yaml`` maps
each address to that host's public key, so one client can reach servers on several hosts.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str | None = None  # the host as written in the cell's tcp:// endpoints


def parse_hosts(text: str) -> list[HostSpec]:
    """``robot,gpu`` or ``robot=10.0.0.2,gpu=10.0.0.3``; raises ValueError on a bad or repeated name."""
    hosts: list[HostSpec] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, address = item.partition("=")
        if not HOST_NAME.match(name):
            raise ValueError(f"host name {name!r}: letters, digits, '-' and '_' only (at most 64)")
        if "=" in item and not address:
            raise ValueError(f"host {name!r}: empty address after '='")
        hosts.append(HostSpec(name, address or None))
    names = [h.name for h in hosts]
    if not hosts:
        raise ValueError("--hosts names no host")
    if len(set(names)) != len(names):
        raise ValueError(f"--hosts names a host twice: {names}")
    addresses = [h.address for h in hosts if h.address]
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"--hosts gives one address to two hosts: {addresses}")
    return hosts


def make_keys(folder: Path, hosts: list[HostSpec]) -> dict[str, Path]:
    """Write every host's folder; returns {host: its folder}. Refuses to overwrite any existing
    host folder (a new key pair would silently lock that host out of the others)."""
    import zmq.auth  # late: `armada --help` stays light

    folder = Path(folder)
    existing = [h.name for h in hosts if (folder / h.name).exists()]
    if existing:
        raise FileExistsError(f"{folder}: key folders already exist for {existing}; remove them first "
                              "(new keys must then be copied to every host)")
    _private_dir(folder)
    staging = folder / ".public"
    _private_dir(staging)
    out: dict[str, Path] = {}
    for h in hosts:
        host_dir = folder / h.name
        _private_dir(host_dir)
        public, secret = zmq.auth.create_certificates(str(host_dir), h.name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        (staging / f"{h.name}.key").write_bytes(Path(public).read_bytes())
        out[h.name] = host_dir
    for h in hosts:
        host_dir = folder / h.name
        for sub in ("allowed", "servers"):
            _private_dir(host_dir / sub)
            for other in hosts:  # a host's own processes connect to its own servers too (armada run)
                (host_dir / sub / f"{other.name}.key").write_bytes((staging / f"{other.name}.key").read_bytes())
        (host_dir / "curve.yaml").write_text(yaml.safe_dump(curve_section(h, hosts), sort_keys=False))
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return out


def curve_section(host: HostSpec, hosts: list[HostSpec]) -> dict:
    """The `curve:` section for ``host``, paths relative to its folder. The default server key is
    the first other host's (a two-host cell: the host this one talks to)."""
    others = [h for h in hosts if h.name != host.name] or [host]
    section: dict = {
        "server_public_key": f"servers/{others[0].name}.key",
        "server_secret_key": f"{host.name}.key_secret",
        "client_secret_key": f"{host.name}.key_secret",
        "authorized_clients": "allowed",
    }
    addressed = {h.address: f"servers/{h.name}.key" for h in hosts if h.address}
    if addressed:
        section["server_keys"] = addressed
    return section


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; exist_ok folders are tightened too


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="make CURVE key pairs (private keys 0600) and allow-lists for remote hosts")
    p.add_argument("folder", help="where to write one folder per host (created 0700)")
    p.add_argument("--hosts", required=True,
                   help="the cell's hosts: robot,gpu or robot=10.0.0.2,gpu=10.0.0.3 (the address as "
                        "written in the cell's tcp:// endpoints; lets a client reach servers on several hosts)")


def run_keys(args: argparse.Namespace) -> int:
    try:
        hosts = parse_hosts(args.hosts)
        dirs = make_keys(Path(args.folder), hosts)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"armada keys: {exc}", file=sys.stderr)
        return 2
    print(f"armada keys: wrote {len(dirs)} host key set(s) in {args.folder}:")
    for name, d in dirs.items():
        print(f"  {name}: {d}  (copy to host {name!r} only; it holds {name}.key_secret)")
    print("on each host: ARMADA_KEYS=<its folder> in the environment of every armada process "
          "(or copy it to the folder the cell's `curve: {keys: ...}` names); see docs/remote.md")
    print("narrow who may connect to a host by removing keys from its allowed/ folder")
    return 0
