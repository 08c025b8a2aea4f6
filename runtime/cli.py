"""`armada ...`: run a cell end to end, start one process, or benchmark.

    armada run [CELL]               the embedded default cell when no CELL is given
    armada driver CELL --name N     one driver process (what systemd runs)
    armada camera CELL --name N     one camera process
    armada infer CELL               the inference process
    armada model make-tiny OUT      a tiny merged bundle with the real layout
    armada model inspect BUNDLE     what a bundle holds
    armada bench [loop|rtt|state|frames|all|model|ur3|piper|cameras]
    armada fake ur3|piper ARGS      a protocol-level device fake, for HIL tests and dry runs
    armada calibrate ...            intrinsics, hand-eye, joints, camera latency
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from runtime.config import DEFAULT_CELL, ConfigError


def _add_process_args(p: argparse.ArgumentParser, named: bool) -> None:
    p.add_argument("cell", nargs="?" if not named else None, type=Path, help="cell YAML")
    p.add_argument("--run-dir", type=Path, default=None, help="folder for ipc sockets ({run_dir} in the cell)")
    if named:
        p.add_argument("--name", default=None, help="which one of the cell's drivers/cameras")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armada", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run episodes on a cell, all processes included")
    run.add_argument("cell", nargs="?", type=Path, default=None, help=f"cell YAML (default: {DEFAULT_CELL.name})")
    run.add_argument("--run-dir", type=Path, default=None)
    run.add_argument("--episodes", type=int, default=1)
    run.add_argument("--duration", type=float, default=None, help="seconds per episode")
    run.add_argument("--instruction", default="auto")
    run.add_argument("--arm", action="store_true",
                     help="let the episode arm disarmed drivers (always on for cells of mock arms only)")
    run.add_argument("--json", action="store_true", help="print the reports as JSON")

    for role in ("driver", "camera"):
        _add_process_args(sub.add_parser(role, help=f"run one {role} process of a cell"), named=True)
    _add_process_args(sub.add_parser("infer", help="run the inference process of a cell"), named=False)

    model = sub.add_parser("model", help="build, inspect and export merged model bundles")
    msub = model.add_subparsers(dest="model_command", required=True)
    tiny = msub.add_parser("make-tiny", help="a tiny random merged bundle with the real layout (built locally)")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--tasks", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    export = msub.add_parser("export-onnx", help="ONNX graphs per task of a bundle (vision, llm, head)")
    export.add_argument("bundle", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--task", action="append", default=None, help="only these tasks (repeatable)")
    export.add_argument("--instruction", default=None, help="fix the prompt to this instruction")
    merge_p = msub.add_parser("merge", help="merge single-task checkpoints into a MergeVLA bundle")
    merge_p.add_argument("out", type=Path)
    merge_p.add_argument("--base", type=Path, required=True, help="the pretrained VLA directory")
    merge_p.add_argument("--task", type=Path, action="append", required=True, help="a task checkpoint (repeat)")
    merge_p.add_argument("--method", choices=["ta", "ties"], default="ta")
    merge_p.add_argument("--lam", type=float, default=0.6, help="TALL mask lambda")
    merge_p.add_argument("--top-k", type=float, default=0.2, help="TIES trim fraction")
    capv = msub.add_parser("capvector", help="pretrained + alpha (aux - std) into a single-model bundle")
    capv.add_argument("out", type=Path)
    capv.add_argument("--pretrained", type=Path, required=True)
    capv.add_argument("--aux", type=Path, required=True)
    capv.add_argument("--std", type=Path, required=True)
    capv.add_argument("--alpha", type=float, required=True)
    capv.add_argument("--head", type=Path, default=None, help="task checkpoint for head and stats (default: --aux)")
    imp = msub.add_parser("import-mergevla", help="a MergeVLA merged directory + its pretrained VLM into a bundle")
    imp.add_argument("merged", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--pretrained", type=Path, required=True)
    for p in (merge_p, capv, imp):
        p.add_argument("--architecture", default="real-libero",
                       help="real-libero, tiny, or a JSON file of MergeVLAConfig.to_dict()")
        p.add_argument("--overwrite", action="store_true")
    inspect = msub.add_parser("inspect", help="summarize a bundle")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--verify", action="store_true", help="also check every file's sha256")

    bench = sub.add_parser("bench", help="measure loop timing, round trips, stream loss, frame latency")
    bench.add_argument("what", nargs="?", default="all",
                       choices=["loop", "rtt", "state", "frames", "all", "model", "ur3", "piper", "cameras"],
                       help="'all' is the spine; 'model' is the merged VLA (needs the model extra); 'ur3' and "
                            "'piper' run the real SDKs against the fakes; 'cameras' the camera processes")
    bench.add_argument("--quick", action="store_true", help="model: tiny size only, fewer repeats")
    bench.add_argument("--seconds", type=float, default=10.0, help="duration of timed runs")
    bench.add_argument("--json", type=Path, default=None, help="also write the results here")

    fake = sub.add_parser("fake", help="run a device fake that the real vendor SDK talks to (see --help of each)")
    fake.add_argument("device", choices=["ur3", "piper"])
    fake.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the fake (try: armada fake ur3 --help)")

    from calibration.cli import add_calibrate_parser

    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"armada: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "driver":
        from drivers.core.process import run_driver

        run_driver(args.cell, args.name, args.run_dir)
    elif args.command == "camera":
        from drivers.cameras.process import run_camera

        run_camera(args.cell, args.name, args.run_dir)
    elif args.command == "infer":
        from runtime.inference.process import run_inference

        run_inference(args.cell, args.run_dir)
    elif args.command == "run":
        return run_cell(args)
    elif args.command == "model":
        return run_model_command(args)
    elif args.command == "fake":
        return run_fake(args.device, args.args)
    elif args.command == "calibrate":
        from calibration.cli import run_calibrate

        return run_calibrate(args)
    elif args.command == "bench":
        if args.what == "model":
            return _bench_model(args)
        if args.what in ("ur3", "piper", "cameras"):
            return _bench_device(args)
        from runtime.bench import run_bench

        return run_bench(args.what, args.seconds, args.json)
    return 0


def run_fake(device: str, argv: list[str]) -> int:
    if device == "ur3":
        from drivers.ur3.fake.controller import main as fake_main
    else:
        from drivers.piper.fake.serve import main as fake_main
    return fake_main(argv)


def _bench_device(args: argparse.Namespace) -> int:
    from runtime.bench import machine

    print(f"machine: {machine()}", flush=True)
    if args.what == "ur3":
        from drivers.ur3.bench import bench_ur3

        result = bench_ur3(max(args.seconds, 5.0))
    elif args.what == "piper":
        from drivers.piper.bench import bench_piper

        result = bench_piper(args.seconds)
    else:
        from drivers.cameras.bench import run_camera_bench

        result = run_camera_bench(args.seconds, quick=args.quick)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), args.what: result}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from runtime.bench import machine
    from runtime.model.bench_model import run_model_bench

    print(f"machine: {machine()}")
    results = {"machine": machine(), "model": run_model_bench(quick=args.quick)}
    print(json.dumps(results["model"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# --------------------------------------------------------------------------- armada model


def run_model_command(args: argparse.Namespace) -> int:
    from runtime.model.bundle import BundleError, inspect_bundle

    try:
        if args.model_command == "make-tiny":
            from runtime.model.tiny import make_tiny_bundle

            make_tiny_bundle(args.out, num_tasks=args.tasks, seed=args.seed, overwrite=args.overwrite,
                             progress=lambda step: print(f"make-tiny: {step} ...", flush=True))
            print(inspect_bundle(args.out))
        elif args.model_command == "export-onnx":
            from runtime.model.onnx_export import export_bundle

            started = time.monotonic()
            written = export_bundle(args.bundle, args.out, args.task, args.instruction,
                                    progress=lambda line: print(f"export-onnx: {line}", flush=True))
            print(f"export-onnx: {len(written)} task(s) in {time.monotonic() - started:.0f} s")
        elif args.model_command in ("merge", "capvector", "import-mergevla"):
            _build_bundle(args)
        elif args.model_command == "inspect":
            print(inspect_bundle(args.bundle, verify=args.verify))
    except (BundleError, ValueError, FileExistsError, OSError) as exc:
        print(f"armada model: {exc}", file=sys.stderr)
        return 2
    return 0


def _architecture(spec: str):
    from runtime.model.mergevla import MergeVLAConfig

    if spec == "real-libero":
        return MergeVLAConfig.real_libero()
    if spec == "tiny":
        return MergeVLAConfig.tiny()
    return MergeVLAConfig.from_dict(json.loads(Path(spec).read_text()))


def _build_bundle(args: argparse.Namespace) -> None:
    from runtime.model import build
    from runtime.model.bundle import inspect_bundle

    def progress(stage: str, done: int, total: int) -> None:
        print(f"\r{args.model_command}: {stage} {done}/{total}", end="", flush=True)

    common = {"architecture": _architecture(args.architecture), "overwrite": args.overwrite, "progress": progress}
    if args.model_command == "merge":
        build.merge_bundle(args.base, args.task, args.out, method=args.method, lam=args.lam, top_k=args.top_k,
                           **common)
    elif args.model_command == "capvector":
        build.capvector_bundle(args.pretrained, args.aux, args.std, args.alpha, args.out, head_dir=args.head,
                               **common)
    else:
        build.import_mergevla(args.merged, args.pretrained, args.out, **common)
    print()
    print(inspect_bundle(args.out))


# --------------------------------------------------------------------------- armada run


def run_cell(args: argparse.Namespace) -> int:
    if not args.json:
        return _run_cell(args, [])
    # --json: stdout carries only the JSON; progress and the readable report go to stderr.
    reports: list[dict[str, Any]] = []
    with contextlib.redirect_stdout(sys.stderr):
        code = _run_cell(args, reports)
    print(json.dumps(reports, indent=2))
    return code


def _run_cell(args: argparse.Namespace, reports: list[dict[str, Any]]) -> int:
    from runtime.inference.client import EpisodeClient
    from runtime.supervisor import CellProcesses, default_run_dir

    from runtime.config import load_cell

    cell_path = args.cell or DEFAULT_CELL
    run_dir = args.run_dir or default_run_dir(load_cell(cell_path).name)
    procs = CellProcesses(cell_path, run_dir)
    cell = procs.cell
    all_mock = all(d.backend.kind == "mock" for d in cell.drivers)
    print(f"armada: cell {cell.name!r}: {len(cell.drivers)} driver(s), {len(cell.cameras)} camera(s), "
          f"{cell.inference.policy.kind} policy, {cell.inference.chunking.mode} chunks")
    with procs:
        t = time.monotonic()
        print("armada: starting processes ...", flush=True)
        try:
            procs.start_all()
        except (RuntimeError, TimeoutError) as exc:
            print(f"armada: {exc}", file=sys.stderr)
            return 1
        print(f"armada: all processes answer ({time.monotonic() - t:.1f} s); logs in {procs.run_dir / 'logs'}")
        client = EpisodeClient(procs.ctx, cell)
        try:
            for _ in range(args.episodes):
                reports.append(_one_episode(client, args, all_mock, cell.inference.episode_duration_s))
        finally:
            client.close()
    ok = all(r["outcome"] == "completed" for r in reports)
    return 0 if ok else 1


def _one_episode(client, args: argparse.Namespace, all_mock: bool, default_duration: float) -> dict[str, Any]:
    duration = args.duration or default_duration
    episode = client.start(args.instruction, duration_s=duration, arm=args.arm or all_mock)
    progress = _Progress(episode, duration)
    report = client.wait_report(episode, timeout_s=duration + 20.0, on_event=progress.on_event)
    progress.finish()
    print(format_report(report))
    return report


class _Progress:
    """One status line, updated in place on a terminal and every few seconds otherwise."""

    def __init__(self, episode: int, duration: float):
        self.episode, self.duration = episode, duration
        self.tty = sys.stdout.isatty()
        self.last_print = 0.0
        self.chunks, self.latency_ms, self.elapsed = 0, 0.0, 0.0

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "route":
            print(f"episode {self.episode}: routed to task {data['task']!r} (margin {data['margin']:.2f})")
        elif event == "chunk":
            self.chunks, self.latency_ms, self.elapsed = data["chunk"] + 1, data["latency_ms"], data["elapsed_s"]
            self._show()
        elif event in ("paused", "resumed"):
            self._newline()
            print(f"episode {self.episode}: {event}: {data.get('reason', '')}".rstrip(": "))

    def _show(self) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last_print < 2.0:
            return
        self.last_print = now
        bar = int(20 * min(1.0, self.elapsed / self.duration))
        line = (f"episode {self.episode} [{'#' * bar}{'.' * (20 - bar)}] {self.elapsed:5.1f}/{self.duration:.0f} s  "
                f"chunks {self.chunks:4d}  latency {self.latency_ms:6.1f} ms")
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def _newline(self) -> None:
        if self.tty:
            print()

    def finish(self) -> None:
        self._newline()


def format_report(r: dict[str, Any]) -> str:
    rates = ", ".join(f"{n} {hz:.1f} Hz" for n, hz in r["control_rate_hz"].items()) or "n/a"
    clamps = ", ".join(f"{k} {v}" for k, v in r["clamps_by_kind"].items() if v) or "none"
    return "\n".join([
        f"episode {r['episode']}: {r['outcome']}  (task {r['task'] or '-'}, {r['duration_s']:.1f} s)",
        f"  control rate       {rates}",
        f"  overruns           {r['overruns']}",
        f"  starved ticks      {r['starved_ticks']}",
        f"  clamps             {r['clamps']} ({clamps})",
        f"  chunks             {r['chunks']} ({r['dropped_points']} late points dropped by the driver)",
        f"  chunk latency      p50 {r['chunk_latency_p50_ms']:.1f} ms, p99 {r['chunk_latency_p99_ms']:.1f} ms, "
        f"max {r['chunk_latency_max_ms']:.1f} ms",
        f"  tracking error     mean {r['tracking_error_mean']:.4f}, max {r['tracking_error_max']:.4f}",
        f"  paused             {r['paused_s']:.2f} s, lease lost {r['lease_lost']}",
    ])


if __name__ == "__main__":
    sys.exit(main())
