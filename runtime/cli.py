"""`armada ...`: run a cell end to end, start one process, or benchmark.

    armada run [CELL]               the embedded default cell when no CELL is given
    armada driver CELL --name N     one driver process (what systemd runs)
    armada camera CELL --name N     one camera process
    armada infer CELL               the inference process
    armada status|estop CELL        each driver's mode and reason; press every driver's e-stop
    armada reset-estop CELL --name N   reset one driver's latched e-stop (it stays disarmed)
    armada model make-tiny OUT      a tiny merged bundle with the real layout
    armada model inspect BUNDLE     what a bundle holds
    armada bench [loop|rtt|state|frames|all|model|cameras|estop|record|sim|filter|remote|anchors|fleet|KIND]
                                    KIND: a device with a bench
    armada serve BUNDLE             the merged VLA as a Ray Serve deployment (a fleet's model service)
    armada fake KIND ARGS           a device's protocol-level fake, for HIL tests and dry runs
    armada calibrate ...            intrinsics, hand-eye, joints, camera latency
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from armada.runtime.config import DEFAULT_CELL, ConfigError
from armada.runtime.rundir import PARENT_PID_ENV, RunDirError
from armada.runtime.terminal import Interrupted, StopSignals, TerminalKeys, say

if TYPE_CHECKING:
    from armada.runtime.console import OperatorConsole

_PR_SET_PDEATHSIG = 1
SPINE_BENCHES = ("loop", "rtt", "state", "frames", "all", "model", "cameras", "estop", "record", "sim", "filter", "remote",
                 "anchors", "fleet", "gpu")
RUN_DIR_HELP = ("private folder for ipc sockets, locks and logs ({run_dir} in the cell); default "
                "$XDG_RUNTIME_DIR/armada-UID/CELL, or /tmp/armada-UID/CELL without XDG_RUNTIME_DIR")


def _add_process_args(p: argparse.ArgumentParser, named: bool) -> None:
    p.add_argument("cell", nargs="?" if not named else None, type=Path, help="cell YAML")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR_HELP)
    if named:
        p.add_argument("--name", default=None, help="which one of the cell's drivers/cameras")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armada", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run episodes on a cell, all processes included",
                         description="Run episodes on a cell, all processes included. On a terminal, keys while "
                                     "it runs: p pause/resume (the drivers hold), s stop the episode and the run, "
                                     "e e-stop every driver (latched), r reset the e-stop (drivers stay disarmed), "
                                     "n next episode. Piped, no keys are read.")
    run.add_argument("cell", nargs="?", type=Path, default=None, help=f"cell YAML (default: {DEFAULT_CELL.name})")
    run.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR_HELP)
    run.add_argument("--episodes", type=int, default=1)
    run.add_argument("--duration", type=float, default=None, help="seconds per episode")
    run.add_argument("--instruction", default="auto")
    run.add_argument("--arm", action="store_true",
                     help="let the episode arm disarmed drivers (always on for cells that move no real hardware)")
    run.add_argument("--json", action="store_true", help="print the reports as JSON")
    run.add_argument("--record", type=Path, default=None, metavar="DIR",
                     help="record every episode to a LeRobotDataset v3 in DIR (created, or resumed)")
    run.add_argument("--repo-id", default=None, help="the dataset's repo id (default: local/<DIR name>)")
    run.add_argument("--sim", action="store_true",
                     help="dry-run the cell in simulation: every driver and camera replaced by its MuJoCo twin")
    run.add_argument("--view", default=None, metavar="MODE",
                     help="a live rerun view: spawn (a viewer window), serve (web viewer), or save:FILE.rrd")
    run.add_argument("--this-host", action="append", default=None, metavar="ADDR",
                     help="a cell split over hosts: this host's address as the cell's tcp endpoints write it "
                          "(repeatable). Only processes binding here (or on ipc) are started; the others are "
                          "waited for. Default: every address this machine can bind (docs/remote.md)")
    run.add_argument("--remote-timeout", type=float, default=None, metavar="S",
                     help="how long to wait for the processes of other hosts to answer (default 30 s)")

    for role in ("driver", "camera"):
        _add_process_args(sub.add_parser(role, help=f"run one {role} process of a cell"), named=True)
    _add_process_args(sub.add_parser("infer", help="run the inference process of a cell"), named=False)
    for op, text in (("status", "each driver's mode, lease holder and fault or e-stop reason"),
                     ("estop", "press the e-stop of every driver of a cell (or --name one)"),
                     ("reset-estop", "reset one driver's latched e-stop; it stays disarmed")):
        _add_process_args(sub.add_parser(op, help=text), named=True)

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
    export.add_argument("--quantize", choices=["int8"], default=None,
                        help="opt-in, for the CPU: int8 MatMul weights, about 1.8-2x faster than float32 on the "
                             "mid bench, but actions differ (tiny model: up to 0.08 normalized, 7x what one gray "
                             "level of camera change does); measure on your checkpoint before a robot uses it")
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
        p.add_argument("--architecture", default=None,
                       help="real-libero, tiny, or a JSON file of MergeVLAConfig.to_dict() (default: the "
                            "architecture.json that `armada model train` wrote beside the base, else real-libero)")
        p.add_argument("--overwrite", action="store_true")
    from armada.runtime.model.train_cli import add_train_parser

    add_train_parser(msub)
    inspect = msub.add_parser("inspect", help="summarize a bundle")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--verify", action="store_true", help="also check every file's sha256")

    from armada.drivers.core.registry import BACKENDS

    plugins = BACKENDS.all()
    device_benches = sorted(k for k, p in plugins.items() if p.bench is not None)
    bench = sub.add_parser("bench", help="measure loop timing, round trips, stream loss, frame latency")
    bench.add_argument("what", nargs="?", default="all",
                       choices=[*SPINE_BENCHES, *(k for k in device_benches if k not in SPINE_BENCHES)],
                       help="'all' is the spine; 'model' is the merged VLA (needs the model extra); "
                            f"{', '.join(device_benches) or 'no device'}: the real SDK against the device's fake; "
                            "'cameras' the camera processes")
    bench.add_argument("--quick", action="store_true", help="model: tiny size only, fewer repeats")
    bench.add_argument("--seconds", type=float, default=None, help="duration of timed runs (10 s; record: 60 s)")
    bench.add_argument("--json", type=Path, default=None, help="also write the results here")
    bench.add_argument("--delay-ms", type=float, default=None,
                       help="remote: one-way delay the proxy adds between the hosts (default 5 ms)")
    bench.add_argument("--cells", default=None, help="fleet: how many cells, comma-separated (default 1,2,4,8)")
    bench.add_argument("--rates", default=None, help="anchors: control rates in Hz, comma-separated (default 50,500)")
    bench.add_argument("--size", choices=["tiny", "mid", "real"], default=None,
                       help="gpu: model size (default real on a GPU, tiny without one)")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="gpu: stop starting new parts after this many seconds (default 480)")
    bench.add_argument("--loads", default=None,
                       help="anchors: inference time as a share of a chunk's duration, comma-separated "
                            "(default 0.3,0.6,0.9)")

    fake = sub.add_parser("fake", help="run a device fake that the real vendor SDK talks to (see --help of each)")
    fake.add_argument("device", choices=sorted(k for k, p in plugins.items() if p.fake is not None))
    fake.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the fake (try: armada fake KIND --help)")

    from armada.calibration.cli import add_calibrate_parser
    from armada.runtime.eval.cli import add_eval_parser
    from armada.runtime.record.cli import add_record_parser
    from armada.runtime.teleop.cli import add_teleop_parser
    from armada.runtime.view import add_view_parser

    add_calibrate_parser(sub)
    add_teleop_parser(sub)
    add_record_parser(sub)
    add_view_parser(sub)
    add_eval_parser(sub)
    from armada.runtime.deploy.systemd_units import add_systemd_parser
    from armada.runtime.doctor.cli import add_doctor_parser
    from armada.runtime.remote.keys import add_keys_parser

    add_systemd_parser(sub)
    add_doctor_parser(sub)
    add_keys_parser(sub)
    from armada.runtime.fleet.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # first: a supervisor may already be gone
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"armada: config error: {exc}", file=sys.stderr)
        return 2
    except RunDirError as exc:
        print(f"armada: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def die_with_parent() -> None:
    """Started by a supervisor: have the kernel SIGTERM us when it dies, whatever kills it (even -9).

    SIGTERM (not SIGKILL) so a driver still holds position and closes its device on the way out.
    The supervisor may have died before the request took effect: then our parent is already
    someone else (init or a subreaper) and we exit at once.
    """
    parent = os.environ.pop(PARENT_PID_ENV, None)  # popped: our own children must not inherit it
    if parent is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise SystemExit(f"armada: cannot ask to die with the supervisor: {os.strerror(ctypes.get_errno())}")
    if str(os.getppid()) != parent:
        raise SystemExit(f"armada: the supervisor (pid {parent}) exited before this process started; not starting")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("driver", "camera", "infer"):
        return _run_process(args)
    if args.command == "calibrate" and getattr(args, "live", None) is not None and args.run_dir is None:
        from armada.runtime.config import load_cell
        from armada.runtime.rundir import resolve_run_dir

        # Where the cell's processes run; checked private, as we talk to whatever listens there.
        args.run_dir = resolve_run_dir(None, load_cell(args.live).name)
    if args.command in ("status", "estop", "reset-estop"):
        return _operator_command(args)
    if args.command == "run":
        return run_cell(args)
    if args.command == "teleop":
        from armada.runtime.teleop.cli import run_teleop

        return run_teleop(args)
    if args.command == "record":
        from armada.runtime.record.cli import run_record

        return run_record(args)
    if args.command == "view":
        from armada.runtime.view import run_view

        return run_view(args)
    if args.command == "eval":
        from armada.runtime.eval.cli import run_eval

        return run_eval(args)
    if args.command == "systemd":
        from armada.runtime.deploy.systemd_units import run_systemd

        return run_systemd(args)
    if args.command == "doctor":
        from armada.runtime.doctor.cli import run_doctor

        return run_doctor(args)
    if args.command == "keys":
        from armada.runtime.remote.keys import run_keys

        return run_keys(args)
    if args.command == "serve":
        from armada.runtime.fleet.serve import run_serve

        return run_serve(args)
    elif args.command == "model":
        return run_model_command(args)
    elif args.command == "fake":
        return run_fake(args.device, args.args)
    elif args.command == "calibrate":
        from armada.calibration.cli import run_calibrate

        return run_calibrate(args)
    elif args.command == "bench":
        if args.seconds is None:
            args.seconds = 60.0 if args.what == "record" else 10.0
        if args.what == "model":
            return _bench_model(args)
        if args.what == "record":
            from armada.runtime.record.bench import run_record_bench

            return run_record_bench(args)
        if args.what == "sim":
            return _bench_sim(args)
        if args.what == "filter":
            return _bench_filter(args)
        if args.what == "remote":
            from armada.runtime.remote.bench import run_remote_bench

            return run_remote_bench(args)
        if args.what == "anchors":
            from armada.runtime.anchors.bench import run_anchors_bench

            return run_anchors_bench(args)
        if args.what == "fleet":
            from armada.runtime.fleet.bench import run_fleet_bench

            return run_fleet_bench(args)
        if args.what == "gpu":
            from armada.runtime.model.bench_gpu import run_gpu_bench

            return run_gpu_bench(args)
        if args.what not in SPINE_BENCHES or args.what == "cameras":
            return _bench_device(args)
        from armada.runtime.bench import run_bench

        return run_bench(args.what, args.seconds, args.json)
    return 0


def _run_process(args: argparse.Namespace) -> int:
    """One process of a cell, in its run dir (created private), holding its instance lock until it
    exits; on a clean exit it removes the socket files it bound (they are its own: it holds the lock)."""
    from armada.runtime.config import load_cell, named
    from armada.runtime.cpus import CpuPlacementError, apply_cpus
    from armada.runtime.exit_deadline import ExitDeadline
    from armada.runtime.rundir import InstanceLock, instance_label, remove_ipc_sockets, resolve_run_dir
    from armada.runtime.supervisor import process_endpoints

    cell = load_cell(args.cell)
    name = None
    if args.command == "driver":
        name = named(cell.driver, args.name, args.cell).name
    elif args.command == "camera":
        name = named(cell.camera, args.name, args.cell).name
    try:
        apply_cpus(cell, args.command, name)  # before any thread starts: they inherit it
    except CpuPlacementError as exc:
        raise SystemExit(f"armada {args.command}: {exc}") from None
    run_dir = resolve_run_dir(args.run_dir, cell.name)
    label = instance_label(args.command, name)
    with InstanceLock(run_dir, label) as lock:
        endpoints = process_endpoints(load_cell(args.cell, run_dir), args.command, name)

        def clean_up() -> None:  # for a stop that hangs, even after run_* returned (exit waits on a thread)
            if lock.held:  # once released, the sockets may be another instance's
                remove_ipc_sockets(endpoints, run_dir)
                lock.release()

        deadline = ExitDeadline(label, clean_up)
        if args.command == "driver":
            from armada.drivers.core.process import run_driver

            run_driver(args.cell, name, run_dir, deadline)
        elif args.command == "camera":
            from armada.drivers.cameras.process import run_camera

            run_camera(args.cell, name, run_dir, deadline)
        else:
            from armada.runtime.inference.process import run_inference

            run_inference(args.cell, run_dir, deadline)
        remove_ipc_sockets(endpoints, run_dir)
    return 0


def _operator_command(args: argparse.Namespace) -> int:
    """status / estop / reset-estop against a running cell; exit 1 when a driver did not comply."""
    from armada.runtime import operator_commands as operator

    cell = operator.load_running_cell(args.cell, args.run_dir)
    if args.command == "status":
        answers = operator.status(cell, args.name)
    elif args.command == "estop":
        answers = operator.estop(cell, args.name)
    else:
        if args.name is None and len(cell.drivers) > 1:
            print("armada: reset-estop needs --name: reset one driver at a time, after checking it",
                  file=sys.stderr)
            return 2
        answers = [operator.reset_estop(cell, args.name or cell.drivers[0].name)]
    print(f"cell {cell.name}:")
    for answer in answers:
        print(answer.line())
    return 0 if all(a.ok for a in answers) else 1


def run_fake(device: str, argv: list[str]) -> int:
    from armada.drivers.core.registry import get

    fake = get(device).fake
    if fake is None:
        raise SystemExit(f"armada fake: backend kind {device!r} has no fake")
    return fake(argv)


def _bench_filter(args: argparse.Namespace) -> int:
    import json

    from armada.drivers.core.filter_bench import bench_filter, print_table
    from armada.runtime.bench import machine

    print(f"machine: {machine()}")
    print(f"bench filter: {args.seconds:g} s of ticks per embodiment and stream ...", flush=True)
    results = bench_filter(args.seconds)
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "filter": results}, indent=2))
    return 0


def _bench_device(args: argparse.Namespace) -> int:
    from armada.runtime.bench import machine

    print(f"machine: {machine()}", flush=True)
    if args.what == "cameras":
        from armada.drivers.cameras.bench import run_camera_bench

        result = run_camera_bench(args.seconds, quick=args.quick)
    else:
        from armada.drivers.core.registry import get

        result = get(args.what).bench(args.seconds)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), args.what: result}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _bench_sim(args: argparse.Namespace) -> int:
    from armada.drivers.sim.bench import run_sim_bench
    from armada.runtime.bench import machine

    print(f"machine: {machine()}", flush=True)
    result = run_sim_bench(args.seconds, quick=args.quick)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                         "sim": result}, indent=2))
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from armada.runtime.bench import machine
    from armada.runtime.model.bench_model import run_model_bench

    print(f"machine: {machine()}")
    results = {"machine": machine(), "model": run_model_bench(quick=args.quick)}
    print(json.dumps(results["model"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# --------------------------------------------------------------------------- armada model


def run_model_command(args: argparse.Namespace) -> int:
    from armada.runtime.model.bundle import BundleError, inspect_bundle

    try:
        if args.model_command == "make-tiny":
            from armada.runtime.model.tiny import make_tiny_bundle

            make_tiny_bundle(args.out, num_tasks=args.tasks, seed=args.seed, overwrite=args.overwrite,
                             progress=lambda step: print(f"make-tiny: {step} ...", flush=True))
            print(inspect_bundle(args.out))
        elif args.model_command == "export-onnx":
            from armada.runtime.model.onnx_export import export_bundle

            started = time.monotonic()
            written = export_bundle(args.bundle, args.out, args.task, args.instruction, quantize=args.quantize,
                                    progress=lambda line: print(f"export-onnx: {line}", flush=True))
            print(f"export-onnx: {len(written)} task(s) in {time.monotonic() - started:.0f} s")
        elif args.model_command in ("merge", "capvector", "import-mergevla"):
            _build_bundle(args)
        elif args.model_command == "inspect":
            print(inspect_bundle(args.bundle, verify=args.verify))
        elif args.model_command == "train":
            from armada.runtime.model.train_cli import run_train

            return run_train(args)
    except (BundleError, ValueError, FileExistsError, OSError) as exc:
        print(f"armada model: {exc}", file=sys.stderr)
        return 2
    return 0


def _architecture(spec: str):
    from armada.runtime.model.mergevla import MergeVLAConfig

    if spec == "real-libero":
        return MergeVLAConfig.real_libero()
    if spec == "tiny":
        return MergeVLAConfig.tiny()
    return MergeVLAConfig.from_dict(json.loads(Path(spec).read_text()))


def _trained_serving(directory: Path):
    """(architecture.json, Serving) of a checkpoint written by `armada model train`, else None."""
    if not (Path(directory) / "architecture.json").is_file():
        return None
    from armada.runtime.model.train import read_serving

    return Path(directory) / "architecture.json", read_serving(Path(directory))


def _build_bundle(args: argparse.Namespace) -> None:
    from armada.runtime.model import build
    from armada.runtime.model.bundle import inspect_bundle

    def progress(stage: str, done: int, total: int) -> None:
        print(f"\r{args.model_command}: {stage} {done}/{total}", end="", flush=True)

    source = {"merge": "base", "capvector": "pretrained", "import-mergevla": "pretrained"}[args.model_command]
    trained = _trained_serving(getattr(args, source))
    spec = args.architecture or (str(trained[0]) if trained else "real-libero")
    common = {"architecture": _architecture(spec), "overwrite": args.overwrite, "progress": progress}
    if args.model_command == "merge":
        build.merge_bundle(args.base, args.task, args.out, method=args.method, lam=args.lam, top_k=args.top_k,
                           serving=trained[1] if trained else None, **common)
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
    from armada.runtime.config import load_cell
    from armada.runtime.rundir import resolve_run_dir

    cell_path = args.cell or DEFAULT_CELL
    cell = load_cell(cell_path)  # a bad cell is refused before anything is created
    if getattr(args, "sim", False):
        from armada.drivers.sim.cell import sim_cell_copy

        cell_path = sim_cell_copy(cell_path, resolve_run_dir(args.run_dir, f"{cell.name}-sim"))
        cell = load_cell(cell_path)
        print(f"armada: --sim: running {cell_path} (the cell's MuJoCo twin)")
    run_dir = resolve_run_dir(args.run_dir, cell.name)
    with StopSignals() as signals:
        procs = None
        code = 1
        try:
            procs = _split_cell_processes(cell_path, run_dir, args)
            if procs is None:
                return 2
            code = _supervise(procs, args, reports)
        except Interrupted as exc:
            signals.defer()
            say(f"armada: {exc}: stopping the episode and all processes (drivers hold position)")
            if procs is not None:
                _stop_episode(procs, f"armada run got {exc}")
        finally:
            signals.defer()  # a signal during the clean-up is noted, not raised: it runs to its end
            if procs is not None:
                procs.close()
        if signals.received is not None:
            say(f"armada: stopped by {signal.Signals(signals.received).name}; all processes stopped")
            return 128 + signals.received
        return code


def _split_cell_processes(cell_path: Path, run_dir: Path, args: argparse.Namespace):
    """The cell's CellProcesses, started here only where they bind here (a cell split over hosts);
    None, having said why, when the split is wrong (a process on two hosts, a bad --this-host)."""
    from armada.runtime.remote.hosts import HostSplitError
    from armada.runtime.supervisor import REMOTE_READY_TIMEOUT_S, CellProcesses

    timeout_s = REMOTE_READY_TIMEOUT_S if args.remote_timeout is None else args.remote_timeout
    if not 0 < timeout_s <= 3600:
        print(f"armada: --remote-timeout {args.remote_timeout}: between 0 and 3600 s", file=sys.stderr)
        return None
    this_host = tuple(args.this_host) if args.this_host else None
    try:
        procs = CellProcesses(cell_path, run_dir, this_host=this_host, remote_timeout_s=timeout_s)
    except HostSplitError as exc:
        print(f"armada: {cell_path}: {exc}", file=sys.stderr)
        return None
    if procs.remote:
        here = [p.title for p in procs.placements if p.local]
        print(f"armada: split cell: this host runs {', '.join(here) or 'nothing'}; other hosts run "
              + ", ".join(f"{p.title} ({p.host})" for p in procs.remote)
              + f" (waited for up to {timeout_s:.0f} s)", flush=True)
    return procs


def _supervise(procs, args: argparse.Namespace, reports: list[dict[str, Any]]) -> int:
    from armada.runtime.console import HELP as CONSOLE_HELP
    from armada.runtime.console import OperatorConsole, parse_keys
    from armada.runtime.inference.client import EpisodeClient

    cell = procs.cell
    from armada.drivers.core.registry import moves_no_hardware

    simulated_only = moves_no_hardware(cell)
    print(f"armada: cell {cell.name!r}: {len(cell.drivers)} driver(s), {len(cell.cameras)} camera(s), "
          f"{cell.inference.policy.kind} policy, {cell.inference.chunking.mode} chunks")
    t = time.monotonic()
    print(f"armada: starting processes in {procs.run_dir} ...", flush=True)
    try:
        procs.start_all()
    except (RuntimeError, TimeoutError) as exc:
        print(f"armada: {exc}", file=sys.stderr)
        return 1
    print(f"armada: all processes answer ({time.monotonic() - t:.1f} s); logs in {procs.run_dir / 'logs'}")
    client = EpisodeClient(procs.ctx, cell)
    recorder = viewer = None
    keys = TerminalKeys(parse_keys)  # reads keys only when stdin is a terminal; piped runs as before
    console = None
    try:
        if args.view:
            from armada.runtime.view import start_view

            viewer = start_view(procs.cell_path, procs.run_dir, args.view)
        if args.record is not None:
            from armada.runtime.record.autonomous import AutonomousRecorder

            recorder = AutonomousRecorder.start(procs, args.record, args.repo_id)
        if not (args.arm or simulated_only) and not _drivers_armed(procs):
            return 1
        with keys:
            console = OperatorConsole(cell, procs.ctx, client, keys, say=print)
            if console.interactive:
                print(f"armada: {CONSOLE_HELP}", flush=True)
            for i in range(args.episodes):
                console.poll(running=False)  # keys pressed between episodes: an e pressed then counts
                if console.end_run:
                    print("armada: the operator ended the run")
                    break
                if console.estopped and not console.wait_after_estop(
                        lambda: "; ".join(why for _, why in procs.dead())):
                    break  # after an e-stop no episode starts unless the operator says n
                report = _one_episode(procs, client, args, simulated_only, cell.inference.episode_duration_s,
                                      console)
                reports.append(report)
                if procs.dead():
                    break  # the episode failed for it; no more episodes on a broken cell
                if console.end_run and i + 1 < args.episodes:
                    print(f"armada: the operator ended the run after episode {report['episode']}")
                    break
    finally:
        if console is not None:
            console.close()
        client.close()
        if recorder is not None:
            recorder.close()  # waits for the last episode to be written; prints where
        if viewer is not None:
            viewer.close()
    return 0 if all(r["outcome"] == "completed" for r in reports) else 1


def _drivers_armed(procs) -> bool:
    """On a real cell the episode arms nothing unless the operator says --arm: say so up front."""
    from armada.runtime.transport import CommandClient, RemoteError

    for drv in procs.cell.drivers:
        cmd = CommandClient(procs.ctx, drv.cmd, procs.cell.curve, default_timeout_s=1.0)
        try:
            mode = cmd.request("ping")["mode"]
        except (TimeoutError, RemoteError) as exc:
            print(f"armada: driver {drv.name} does not answer: {exc}", file=sys.stderr)
            return False
        finally:
            cmd.close()
        if mode not in ("armed", "running"):
            print(f"armada: driver {drv.name} is {mode}: run with --arm to let the episode arm it "
                  f"(or arm it yourself first)", file=sys.stderr)
            return False
    return True


def _one_episode(procs, client, args: argparse.Namespace, simulated_only: bool, default_duration: float,
                 console: OperatorConsole | None = None) -> dict[str, Any]:
    from armada.runtime.transport import RemoteError

    duration = args.duration or default_duration
    if console is not None:
        console.new_episode()
    try:
        episode = client.start(args.instruction, duration_s=duration, arm=args.arm or simulated_only)
    except (TimeoutError, RemoteError) as exc:  # e.g. the inference process died just now
        why = "; ".join(w for _, w in procs.dead()) or str(exc)
        report = _failed_report(0, f"failed to start: {why}")
        print(format_report(report))
        return report
    interactive = console is not None and console.interactive
    progress = _Progress(episode, duration, console.status if interactive else None)

    def on_event(event: str, data: dict[str, Any]) -> None:
        if console is not None:
            console.on_event(event, data)
        progress.on_event(event, data)

    def look(running: bool) -> None:  # between looks at the episode: the operator's keys, the status line
        console.poll(running)
        progress.refresh()

    if console is not None:
        console.say = progress.message  # its lines must not land in the middle of the status line
    try:
        report = _follow_episode(procs, client, episode, duration + 20.0, on_event,
                                 look if interactive else None)
    finally:
        progress.finish()
        if console is not None:
            console.say = print
    if console is not None and console.operator_stop and not report["outcome"].startswith("completed"):
        report = dict(report)  # say why the episode ended early: the inference side only knows "stopped"/"failed"
        report["outcome"] = f"{report['outcome']} ({console.operator_stop})"
    print(format_report(report))
    return report


def _follow_episode(procs, client, episode: int, timeout_s: float, on_event,
                    look: Callable[[bool], None] | None = None) -> dict[str, Any]:
    """Follow the episode's events until its report, watching the children all along: a child that
    dies ends the episode as failed, naming it and how it died. ``look`` runs between looks (the
    operator console's keys)."""
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        dead = procs.dead()
        if dead:
            return _child_died(procs, client, episode, [why for _, why in dead])
        if look is not None:
            look(True)
        msg = client.events.recv(0.1 if look is None else 0.03)  # keys: an e-stop must not wait long
        if msg is not None:
            quiet_since = time.monotonic()
            data = msg.get("data") or {}
            on_event(msg["event"], data)
            if msg["event"] == "episode_ended" and data.get("episode") == episode:
                return data
        elif time.monotonic() - quiet_since > 1.0:
            quiet_since = time.monotonic()
            report = _status_report(client, episode)  # the ended event may have been missed
            if report is not None:
                return report
    _stop_episode(procs, "armada run: the episode did not end in time")
    return _failed_report(episode, f"failed: the episode did not end within {timeout_s:.0f} s")


def _status_report(client, episode: int) -> dict[str, Any] | None:
    from armada.runtime.transport import RemoteError

    try:
        status = client.ctl.request("status", timeout_s=1.0)
    except (TimeoutError, RemoteError):
        return None  # a dead inference process is seen by the child watch on the next turn
    report = status.get("last_report")
    if not status.get("running") and report and report.get("episode") == episode:
        return report
    return None


def _child_died(procs, client, episode: int, why: list[str]) -> dict[str, Any]:
    reason = "; ".join(why)
    print(f"armada: {reason}: episode {episode} failed; stopping all processes", file=sys.stderr, flush=True)
    _stop_episode(procs, reason)
    report = _await_report(procs, client, episode, timeout_s=3.0)
    report = dict(report) if report is not None else _failed_report(episode, "")
    inner = report["outcome"]
    report["outcome"] = f"failed: {reason}" + (f" (episode: {inner})" if inner else "")
    return report


def _await_report(procs, client, episode: int, timeout_s: float) -> dict[str, Any] | None:
    """The report of an episode being stopped, if the inference process still lives to send it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(c.role == "infer" and c.proc.poll() is None for c in procs.children):
            return None
        msg = client.events.recv(0.1)
        if msg is None:
            continue
        data = msg.get("data") or {}
        if msg["event"] == "episode_ended" and data.get("episode") == episode:
            return data
    return _status_report(client, episode)


def _stop_episode(procs, reason: str) -> None:
    """Ask the inference process to end its episode (it releases the leases: drivers hold)."""
    from armada.runtime.transport import CommandClient, RemoteError

    infer = [c for c in procs.children if c.role == "infer" and c.proc.poll() is None]
    if not infer:
        return
    ctl = CommandClient(procs.ctx, procs.cell.inference.ctl, procs.cell.curve, default_timeout_s=1.0)
    try:
        ctl.request("episode_stop", reason=reason)
    except (TimeoutError, RemoteError):
        pass  # stopping the process ends the episode too
    finally:
        ctl.close()


def _failed_report(episode: int, outcome: str) -> dict[str, Any]:
    return {"episode": episode, "outcome": outcome}


class _Progress:
    """One status line, updated in place on a terminal and every few seconds otherwise. ``status``
    (the operator console's: task, drivers' modes, rates, clamps, pause) is appended on a terminal."""

    def __init__(self, episode: int, duration: float, status: Callable[[], str] | None = None):
        self.episode, self.duration = episode, duration
        self.tty = sys.stdout.isatty()
        self.status = status
        self.last_print = 0.0
        self.chunks, self.latency_ms, self.elapsed = 0, 0.0, 0.0
        self.started = time.monotonic()
        self.in_place = False  # a line is being updated in place: a message needs a newline first

    def on_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "route":
            self._newline()
            print(f"episode {self.episode}: routed to task {data['task']!r} (margin {data['margin']:.2f})")
        elif event == "chunk":
            self.chunks, self.latency_ms, self.elapsed = data["chunk"] + 1, data["latency_ms"], data["elapsed_s"]
            self._show()
        elif event == "late":
            self._newline()
            print(f"episode {self.episode}: chunk {data['chunk']} came late (inference {data['latency_ms']:.0f} ms, "
                  f"the chunk spans {data['span_ms']:.0f} ms): skipped, the arm holds")
        elif event in ("paused", "resumed"):
            self._newline()
            print(f"episode {self.episode}: {event}: {data.get('reason', '')}".rstrip(": "))

    def refresh(self) -> None:
        """Redraw the line while no chunk comes (paused, e-stopped): the console's status moves on."""
        if self.status is not None and time.monotonic() - self.last_print > 0.5:
            self.elapsed = max(self.elapsed, min(self.duration, time.monotonic() - self.started))
            self._show()

    def message(self, text: str) -> None:
        """A line of its own (the console's), over the status line, which is drawn again after it."""
        print("\r\x1b[K" + text if self.tty and self.in_place else text, flush=True)
        self.in_place = False

    def _show(self) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last_print < 2.0:
            return
        self.last_print = now
        bar = int(20 * min(1.0, self.elapsed / self.duration))
        line = (f"episode {self.episode} [{'#' * bar}{'.' * (20 - bar)}] {self.elapsed:5.1f}/{self.duration:.0f} s  "
                f"chunks {self.chunks:4d}  latency {self.latency_ms:6.1f} ms")
        if self.status is not None:
            line += "  " + self.status()
        if self.tty:
            print("\r\x1b[K" + line, end="", flush=True)  # erase to the end: a shorter line leaves no tail
            self.in_place = True
        else:
            print(line, flush=True)

    def _newline(self) -> None:
        if self.tty and self.in_place:
            print()
        self.in_place = False

    def finish(self) -> None:
        self._newline()


def format_report(r: dict[str, Any]) -> str:
    if "control_rate_hz" not in r:  # no report from the inference process (it died): what we know
        return f"episode {r['episode']}: {r['outcome']}"
    rates = ", ".join(f"{n} {hz:.1f} Hz" for n, hz in r["control_rate_hz"].items()) or "n/a"
    clamps = ", ".join(f"{k} {v}" for k, v in r["clamps_by_kind"].items() if v) or "none"
    return "\n".join([
        f"episode {r['episode']}: {r['outcome']}  (task {r['task'] or '-'}, {r['duration_s']:.1f} s)",
        f"  control rate       {rates}",
        f"  overruns           {r['overruns']}",
        f"  starved ticks      {r['starved_ticks']}",
        f"  clamps             {r['clamps']} ({clamps})",
        f"  chunks             {r['chunks']} ({r['dropped_points']} late points dropped by the driver, "
        f"{r.get('late_chunks', 0)} late chunks skipped)",
        f"  chunk latency      p50 {r['chunk_latency_p50_ms']:.1f} ms, p99 {r['chunk_latency_p99_ms']:.1f} ms, "
        f"max {r['chunk_latency_max_ms']:.1f} ms",
        f"  tracking error     mean {r['tracking_error_mean']:.4f}, max {r['tracking_error_max']:.4f}",
        f"  paused             {r['paused_s']:.2f} s, lease lost {r['lease_lost']}",
        *([f"  interventions      {r['interventions']} ({r.get('intervened_s', 0.0):.1f} s by the operator)"]
          if r.get("interventions") else []),
    ])


if __name__ == "__main__":
    sys.exit(main())
