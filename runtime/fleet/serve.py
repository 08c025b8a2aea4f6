"""`armada serve BUNDLE`: the merged bundle as a Ray Serve deployment, the model service of a fleet.

Without ``--address`` a Ray instance is started here, for development; with ``--address auto``
(a cluster this host belongs to) or ``ray://head:10001`` the deployment goes to that cluster.
Prints where it listens and the policy section a cell needs; Ctrl-C (or SIGTERM) shuts it down.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve a merged bundle as a Ray Serve deployment (a fleet's model service)")
    serve.add_argument("bundle", type=Path, help="a merged bundle directory, or 'tiny' (the tiny bundle, built locally)")
    serve.add_argument("--address", default=None,
                       help="a Ray cluster: 'auto' (this host's) or ray://HEAD:10001; default: a local Ray started here")
    serve.add_argument("--replicas", type=int, default=1, help="replicas of the model (default 1)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default 127.0.0.1; 0.0.0.0 "
                                                          "for cells on other hosts: plain HTTP, a trusted network only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests batched per replica (default 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="how long a batch waits for more requests (default 2 ms; added to every request)")
    serve.add_argument("--resident-tasks", type=int, default=-1,
                       help="task weight sets kept materialized per replica: 0 materializes on each switch; "
                            "default -1: as many as fit in --resident-budget-mb")
    serve.add_argument("--resident-budget-mb", type=float, default=2048.0,
                       help="memory per replica for kept task weight sets (default 2048 MB)")
    serve.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    serve.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    serve.add_argument("--tiny-tasks", type=int, default=2, help="tasks of the tiny bundle (with BUNDLE 'tiny')")
    serve.add_argument("--no-verify", action="store_true", help="skip the bundle's checksum check at start-up")


def options_from_args(args: argparse.Namespace) -> Any:
    from armada.runtime.fleet.service import ServiceOptions

    for name in ("replicas", "max_batch_size", "port", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.resident_tasks < -1 or args.batch_wait_ms < 0 or args.replica_cpus < 0 or args.resident_budget_mb < 0:
        raise ValueError("--resident-tasks must be -1 or more; --batch-wait-ms, --replica-cpus and "
                         "--resident-budget-mb must not be negative")
    return ServiceOptions(bundle=str(resolve_bundle_arg(args.bundle, args.tiny_tasks)), replicas=args.replicas,
                          max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1e3,
                          resident_tasks=args.resident_tasks, resident_budget_mb=args.resident_budget_mb,
                          replica_cpus=args.replica_cpus, threads=args.threads,
                          verify=not args.no_verify, host=args.host, port=args.port)


def resolve_bundle_arg(bundle: Path, tiny_tasks: int = 2) -> Path:
    if str(bundle) == "tiny":
        from armada.runtime.model.plugin import MergedVLAPolicyConfig, resolve_bundle

        return resolve_bundle(MergedVLAPolicyConfig(bundle="tiny", tiny_tasks=tiny_tasks), Path.cwd())
    bundle = bundle.expanduser().resolve()
    if not (bundle / "manifest.json").exists():
        raise ValueError(f"{bundle} is not a bundle (no manifest.json); build one with `armada model build` "
                         "or pass 'tiny'")
    return bundle


def run_serve(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray") is None:  # say clearly that the extra is missing
        print("armada serve needs Ray Serve: pip install 'armada[fleet]' (ray[serve]==2.60.0)", file=sys.stderr)
        return 2
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        print(f"armada serve: {exc}", file=sys.stderr)
        return 2
    from armada.runtime.fleet.service import start_service

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"starting {opts.replicas} replica(s) of {opts.bundle} ({'local Ray' if args.address is None else args.address})",
          flush=True)
    try:
        service = start_service(opts, address=args.address)
    except (TimeoutError, RuntimeError, ConnectionError) as exc:
        print(f"armada serve: {exc}", file=sys.stderr)
        return 1
    print(f"model service listening on {service.url} (GET /health, /stats; POST /route, /infer)\n"
          f"a cell uses it with:\n  inference:\n    policy: {{kind: remote, url: \"{service.url}\"}}\n"
          "Ctrl-C stops it.", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("shutting the model service down", flush=True)
        service.shutdown()
    return 0
