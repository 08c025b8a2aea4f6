"""`armada view CELL` and `armada run --view MODE`: a live rerun view of a running cell.

The view is one more subscriber of the cell's streams, nothing else: cameras (newest frame per
camera, about 10 Hz), each driver's state (measured and commanded position per joint, about
50 Hz), and the inference events (route with its scores per task, chunks, episode start and end,
pauses, interventions). It never sends a command.

It must never slow the cell down. Publishers never block on a subscriber (ZeroMQ PUB drops at
its high-water mark), the view reads on a fixed tick of its own with small queues (two frames
per camera: older frames are dropped, the newest wins), decodes only the newest state message
per driver per tick (a driver publishes at its control rate, 500 Hz for the mock arm; decoding
them all cost more than the rest of the view), subsamples images to 320 pixels wide before
compressing them, and lowers its own CPU priority before rerun starts its threads, so on a busy
host the drivers' loops go first. A driver mode or lease holder that lasts less than a tick
(20 ms) can be missed by the view's log lines; the joints are sampled at the tick rate.

Modes: ``spawn`` (a rerun viewer window), ``serve`` (a gRPC server plus rerun's web viewer,
for a headless robot PC: open the printed address), ``save:FILE.rrd`` (a recording to open
later with ``rerun FILE.rrd``). rerun-sdk is imported only inside the view process, never when
the CLI builds its parser.

Timeline: ``wall``, the senders' host wall clock (state ``t_ns``, frame ``capture_ns``, event
``t_ns``), so images, joints and events from different processes line up.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("armada.view")

CAMERA_HZ = 10.0
STATE_HZ = 50.0
TICK_S = 0.02  # the view's own loop period: everything queued is read once per tick
FLUSH_S = 0.1  # joint samples are sent to rerun in columns this often
FRAME_QUEUE = 2  # frames queued per camera; older ones are dropped by ZeroMQ
MAX_IMAGE_WIDTH = 320  # images are subsampled (every n-th pixel) to at most this wide: a view, not a dataset
MAX_STATES_PER_TICK = 2000  # raw state messages read per driver per tick, at most (a flood stays bounded)
STOP_TIMEOUT_S = 5.0  # close(): SIGTERM, then this long before SIGKILL
VIEW_NICE = 10  # how much lower than the cell the view runs
PIP_HINT = "rerun-sdk is not installed: .venv/bin/pip install rerun-sdk"
READY_LINE = "armada view: ready"  # start_view waits for this in the child's log
READY_TIMEOUT_S = 15.0  # importing rerun and starting its sink takes a second or two


@dataclass(frozen=True)
class ViewMode:
    kind: str  # spawn, serve or save
    path: Path | None = None  # save only


def parse_mode(text: str) -> ViewMode:
    if text in ("spawn", "serve"):
        return ViewMode(text)
    if text.startswith("save:") and len(text) > len("save:"):
        return ViewMode("save", Path(text[len("save:"):]))
    raise ValueError(f"view mode {text!r}: use spawn, serve or save:FILE.rrd")


# --------------------------------------------------------------------------- CLI


def add_view_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("view", help="a live rerun view of a running cell (cameras, joints, chunks, router scores)")
    p.add_argument("cell", type=str, help="cell YAML")
    p.add_argument("--run-dir", type=Path, default=None, help="where the cell's processes run (their ipc sockets)")
    p.add_argument("--mode", default="spawn", metavar="MODE",
                   help="spawn (a viewer window), serve (web viewer, for a headless PC) or save:FILE.rrd")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    p.add_argument("--camera-hz", type=float, default=CAMERA_HZ, help=f"images per camera per second ({CAMERA_HZ:g})")
    p.add_argument("--state-hz", type=float, default=STATE_HZ, help=f"joint samples per driver per second ({STATE_HZ:g})")
    p.add_argument("--max-image-width", type=int, default=MAX_IMAGE_WIDTH,
                   help=f"subsample images to at most this wide ({MAX_IMAGE_WIDTH}; 0: full size)")
    p.add_argument("--web-port", type=int, default=None, help="serve: the web viewer's port (rerun's default 9090)")


def run_view(args: argparse.Namespace) -> int:
    try:
        mode = parse_mode(args.mode)
    except ValueError as exc:
        print(f"armada view: {exc}", file=sys.stderr)
        return 2
    if not args.camera_hz > 0 or not args.state_hz > 0:
        print("armada view: --camera-hz and --state-hz must be > 0", file=sys.stderr)
        return 2
    os.nice(VIEW_NICE)  # first, so that rerun's threads inherit it
    try:
        import rerun as rr
    except ImportError:
        print(f"armada view: {PIP_HINT}", file=sys.stderr)
        return 2
    from armada.runtime.config import load_cell
    from armada.runtime.rundir import resolve_run_dir

    cell = load_cell(args.cell)
    run_dir = resolve_run_dir(args.run_dir, cell.name)
    cell = load_cell(args.cell, run_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    rec = rr.RecordingStream("armada-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in cell.name))
    try:
        _connect(rr, rec, mode, args.web_port)
    except Exception as exc:  # no display for spawn, a port in use for serve, an unwritable file for save
        print(f"armada view: cannot start the {mode.kind} view: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    view = LiveView(cell, Path(args.cell), rec, camera_hz=args.camera_hz, state_hz=args.state_hz,
                    max_image_width=args.max_image_width)
    time.sleep(0.2)  # let the subscriptions connect: a PUB drops what it sends before they do
    print(READY_LINE, flush=True)
    try:
        view.run(stop, args.seconds)
    finally:
        view.close()
    print(f"armada view: {view.counts.summary()}", flush=True)
    return 0


def _connect(rr: Any, rec: Any, mode: ViewMode, web_port: int | None) -> None:
    if mode.kind == "save":
        assert mode.path is not None
        mode.path.parent.mkdir(parents=True, exist_ok=True)
        rec.save(mode.path)
        print(f"armada view: recording to {mode.path} (open with: rerun {mode.path})", flush=True)
    elif mode.kind == "spawn":
        # rerun-sdk installs the viewer (`rerun`) next to this interpreter; a venv run without
        # activating it does not have that folder on PATH, and spawn looks for it there.
        here = str(Path(sys.executable).parent)
        if (Path(here) / "rerun").exists() and here not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
        rec.spawn(memory_limit="25%")
    else:
        url = rec.serve_grpc(server_memory_limit="512MiB")
        rr.serve_web_viewer(web_port=web_port, open_browser=False, connect_to=url)
        print(f"armada view: serving {url}; web viewer on port {web_port or 9090} of this host", flush=True)


# --------------------------------------------------------------------------- the view


@dataclass
class Counts:
    images: int = 0
    state_samples: int = 0
    states_seen: int = 0
    events: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        bad = f", rejected {self.rejected}" if self.rejected else ""
        return (f"{self.images} images, {self.state_samples} joint samples (of {self.states_seen} states received), "
                f"{self.events} events{bad}")


@dataclass
class _Joints:
    names: list[str]
    last_ns: int = 0  # the last sample kept (decimation)
    times: list[float] = field(default_factory=list)
    measured: list[np.ndarray] = field(default_factory=list)
    commanded: list[np.ndarray] = field(default_factory=list)
    mode: str = ""
    holder: str = ""


class LiveView:
    """Reads the cell's streams on a fixed tick and logs them to a rerun recording stream."""

    def __init__(self, cell: Any, cell_path: Path | None, rec: Any, camera_hz: float = CAMERA_HZ,
                 state_hz: float = STATE_HZ, max_image_width: int = MAX_IMAGE_WIDTH):
        import rerun as rr
        import zmq

        from armada.runtime.config import driver_embodiment
        from armada.runtime.transport import FrameSubscriber, Subscriber

        self.rr, self.rec = rr, rec
        self.ctx = zmq.Context()
        self.frames = {c.name: FrameSubscriber(self.ctx, c.frames, hwm=FRAME_QUEUE, curve=cell.curve)
                       for c in cell.cameras}
        self.states = {d.name: Subscriber(self.ctx, d.state, cell.curve, hwm=1000) for d in cell.drivers}
        self.events = Subscriber(self.ctx, cell.inference.events, cell.curve, hwm=1000)
        self.joints = {d.name: _Joints(driver_embodiment(cell_path, d).joint_names) for d in cell.drivers}
        self.camera_period_ns = int(1e9 / camera_hz)
        # The tick already samples each driver's newest state: keep a sample unless it comes
        # sooner than the asked period less half a tick (tick jitter must not halve the rate).
        self.state_period_ns = max(0, int(1e9 / state_hz - TICK_S * 1e9 / 2))
        self._camera_due = {name: 0 for name in self.frames}
        self.max_image_width = max_image_width
        self.counts = Counts()

    def run(self, stop: threading.Event, seconds: float | None = None) -> None:
        end = None if seconds is None else time.monotonic() + seconds
        next_flush = next_tick = time.monotonic()
        while not stop.is_set() and (end is None or time.monotonic() < end):
            self.tick()
            now = time.monotonic()
            if now >= next_flush:
                self.flush_joints()
                next_flush = now + FLUSH_S
            # A fixed rate, not a fixed pause: work done in a tick does not stretch the period;
            # a view starved of CPU (it is niced) skips ticks rather than catching up.
            next_tick = max(next_tick + TICK_S, now)
            stop.wait(next_tick - now)
        self.tick()
        self.flush_joints()

    def tick(self) -> None:
        now = time.monotonic_ns()
        for name, sub in self.states.items():
            msg = _newest(sub)
            if msg is not None:
                self._take_state(name, msg)
        for msg in self.events.drain():
            self._take_event(msg)
        for name, sub in self.frames.items():
            if now >= self._camera_due[name]:
                frame = sub.recv_latest()
                if frame is not None:
                    self._camera_due[name] = now + self.camera_period_ns
                    self._log_frame(name, frame)

    # ------------------------------------------------------------------ cameras

    def _log_frame(self, name: str, frame: Any) -> None:
        rr = self.rr
        pixels = frame.pixels
        if self.max_image_width and pixels.shape[1] > self.max_image_width:
            step = -(-pixels.shape[1] // self.max_image_width)  # ceil
            pixels = np.ascontiguousarray(pixels[::step, ::step])
        color = "L" if pixels.ndim == 2 or pixels.shape[-1] == 1 else "RGB"
        self.rec.set_time("wall", timestamp=frame.header["capture_ns"] * 1e-9)
        self.rec.log(f"cameras/{name}", rr.Image(pixels, color_model=color).compress(jpeg_quality=75))
        self.counts.images += 1

    # ------------------------------------------------------------------ driver state

    def _take_state(self, driver: str, msg: dict[str, Any]) -> None:
        j = self.joints[driver]
        self._transitions(driver, j, msg)
        if msg["t_ns"] - j.last_ns < self.state_period_ns:
            return
        j.last_ns = msg["t_ns"]
        j.times.append(msg["t_ns"] * 1e-9)
        j.measured.append(np.asarray(msg["measured"], dtype=np.float64))
        j.commanded.append(np.asarray(msg["commanded"], dtype=np.float64))

    def _transitions(self, driver: str, j: _Joints, msg: dict[str, Any]) -> None:
        """Mode and lease holder changes, as lines in the driver's log."""
        holder = msg.get("lease_holder", "")
        if msg["mode"] == j.mode and holder == j.holder:
            return
        parts = []
        if msg["mode"] != j.mode:
            parts.append(f"mode {j.mode or '?'} -> {msg['mode']}" + (f" ({msg['reason']})" if msg.get("reason") else ""))
        if holder != j.holder:
            parts.append(f"lease {j.holder or 'free'} -> {holder or 'free'}")
        j.mode, j.holder = msg["mode"], holder
        level = "WARN" if msg["mode"] in ("fault", "estop") else "INFO"
        self._text(f"drivers/{driver}/log", msg["t_ns"], f"{driver}: " + ", ".join(parts), level)

    def flush_joints(self) -> None:
        """Send the kept samples as columns: one call per joint and series, not one per sample."""
        rr = self.rr
        for driver, j in self.joints.items():
            if not j.times:
                continue
            times = rr.TimeColumn("wall", timestamp=np.array(j.times))
            for series, rows in (("measured", j.measured), ("commanded", j.commanded)):
                values = np.stack(rows)
                for i in range(values.shape[1]):
                    joint = j.names[i] if i < len(j.names) else f"j{i}"
                    self.rec.send_columns(f"joints/{driver}/{joint}/{series}", indexes=[times],
                                          columns=rr.Scalars.columns(scalars=values[:, i]))
            self.counts.state_samples += len(j.times)
            j.times, j.measured, j.commanded = [], [], []

    # ------------------------------------------------------------------ inference events

    def _take_event(self, msg: dict[str, Any]) -> None:
        self.counts.events += 1
        event, data, t_ns = msg["event"], msg.get("data") or {}, msg["t_ns"]
        handler = getattr(self, f"_event_{event}", None)
        if handler is not None:
            handler(data, t_ns)
        else:
            self._text("inference/log", t_ns, f"{event}: {_short(data)}")

    def _event_episode_started(self, d: dict[str, Any], t_ns: int) -> None:
        self._text("inference/log", t_ns, f"episode {d.get('episode')} started: {d.get('instruction')!r}, "
                                          f"{d.get('duration_s')} s")

    def _event_episode_ended(self, d: dict[str, Any], t_ns: int) -> None:
        outcome = str(d.get("outcome", "?"))
        extra = f", {d.get('interventions')} intervention(s) {d.get('intervened_s', 0):.1f} s" \
            if d.get("interventions") else ""
        self._text("inference/log", t_ns, f"episode {d.get('episode')} ended: {outcome}, task {d.get('task')!r}, "
                                          f"{d.get('chunks')} chunks, {d.get('duration_s', 0):.1f} s{extra}",
                   "INFO" if outcome == "completed" else "WARN")

    def _event_route(self, d: dict[str, Any], t_ns: int) -> None:
        scores, probs = d.get("scores") or {}, d.get("probabilities") or {}
        self._text("inference/log", t_ns, f"routed to {d.get('task')!r} (margin {d.get('margin', 0):.3f}; "
                                          f"scores {_short(scores)})")
        self.rec.set_time("wall", timestamp=t_ns * 1e-9)
        for series, values in (("scores", scores), ("probabilities", probs)):
            if isinstance(values, dict):
                for task, value in values.items():
                    self.rec.log(f"router/{series}/{task}", self.rr.Scalars(float(value)))

    def _event_chunk(self, d: dict[str, Any], t_ns: int) -> None:
        self.rec.set_time("wall", timestamp=t_ns * 1e-9)
        for key in ("latency_ms", "dropped", "chunk"):
            if key in d:
                self.rec.log(f"inference/chunks/{key}", self.rr.Scalars(float(d[key])))

    def _event_paused(self, d: dict[str, Any], t_ns: int) -> None:
        self._text("inference/log", t_ns, f"paused: {d.get('reason')}", "WARN")

    def _event_intervention_started(self, d: dict[str, Any], t_ns: int) -> None:
        self._text("inference/log", t_ns, f"episode {d.get('episode')}: the operator took over", "WARN")

    def _event_intervention_ended(self, d: dict[str, Any], t_ns: int) -> None:
        how = "handed back" if d.get("resumed", True) else "still the operator's when the episode ended"
        self._text("inference/log", t_ns, f"episode {d.get('episode')}: {how} after {d.get('intervened_s', 0):.1f} s")

    def _text(self, path: str, t_ns: int, text: str, level: str = "INFO") -> None:
        self.rec.set_time("wall", timestamp=t_ns * 1e-9)
        self.rec.log(path, self.rr.TextLog(text, level=level))

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        for name, sub in [*self.frames.items(), *self.states.items(), ("events", self.events)]:
            if sub.counters.rejected:
                self.counts.rejected[name] = sub.counters.rejected
            if name in self.states:
                self.counts.states_seen += sub.counters.received
            sub.close()
        self.ctx.term()
        try:
            self.rec.flush(timeout_sec=STOP_TIMEOUT_S)  # bounded: a stuck viewer must not keep us
            self.rec.disconnect()
        except Exception as exc:
            log.warning("the rerun stream did not close cleanly: %s", exc)


def _newest(sub: Any) -> dict[str, Any] | None:
    """The newest valid message queued on a Subscriber, decoding only that one (and older ones
    only if it does not decode); what it skips is read and dropped. Bounded per call."""
    import zmq

    from armada.runtime import protocol
    from armada.runtime.protocol import ProtocolError

    raws = []
    for _ in range(MAX_STATES_PER_TICK):
        if not sub.socket.poll(0, zmq.POLLIN):
            break
        raws = [*raws[-3:], sub.socket.recv(zmq.NOBLOCK, copy=False)]
        sub.counters.received += 1
    for raw in reversed(raws):
        try:
            return protocol.decode_valid(raw.buffer, sub.limits)
        except ProtocolError as err:
            sub.counters.reject(err)
    return None


def read_rrd(path: str | Path) -> dict[str, dict[str, list]]:
    """What a saved view holds: {entity path: {column: values}} of the first recording in an .rrd
    file, read with rerun's own reader (for checks and tests; it loads the whole file)."""
    from collections import defaultdict

    from rerun.chunk import RrdReader

    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for chunk in RrdReader(path).stream():
        batch = chunk.to_record_batch()
        for name in batch.schema.names:
            out[chunk.entity_path][name] += batch.column(name).to_pylist()
    return out


def _short(data: Any, limit: int = 200) -> str:
    text = repr(data)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- as a child of `armada run`


class ViewHandle:
    """The view process started by ``armada run --view``; ``close`` stops it."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc, self.log_path = proc, log_path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the view (pid %d) did not stop within %.0f s; killing it", self.proc.pid, timeout_s)
                self.proc.kill()
                self.proc.wait(timeout_s)
        return self.proc.returncode


def start_view(cell_path: Path, run_dir: Path, mode: str) -> ViewHandle:
    """Start ``armada view`` as a child that dies with us (see cli.die_with_parent)."""
    from armada.runtime.rundir import PARENT_PID_ENV, open_log

    try:
        parse_mode(mode)
    except ValueError as exc:
        raise SystemExit(f"--view: {exc}") from None
    if importlib.util.find_spec("rerun") is None:
        raise SystemExit(f"--view: {PIP_HINT}")
    args = [sys.executable, "-m", "armada.runtime.cli", "view", str(cell_path), "--run-dir", str(run_dir),
            "--mode", mode]
    env = os.environ | {"PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
    log_path = Path(run_dir) / "logs" / "view.log"
    with open_log(log_path) as out:
        # Its own process group, as the cell's processes: Ctrl-C reaches us, and we stop it.
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                process_group=0)
    handle = ViewHandle(proc, log_path)
    _wait_ready(handle)
    print(f"armada: live view ({mode}) running, pid {proc.pid}, log {log_path}", flush=True)
    return handle


def _wait_ready(handle: ViewHandle, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the view has subscribed (so the first episode's events are in it), it exits, or the
    timeout: a view that is slow to start is not worth failing a run for, only saying so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if READY_LINE in handle.log_path.read_text(errors="replace"):
            return
        if not handle.alive:
            tail = handle.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"--view: the view exited ({handle.proc.returncode}): {' | '.join(tail)}")
        time.sleep(0.05)
    log.warning("the view is not ready after %.0f s; going on without waiting (log: %s)", timeout_s, handle.log_path)
