"""The recorder process: receives every frame and state message itself, aligns, writes the dataset.

``python -m armada.runtime.record.writer CELL --run-dir R --dataset D --repo-id ID [--fps N]``

It runs out of every control loop, as its own process (lerobot's encoding spikes to hundreds of
ms). Its parent sends episode control as JSON lines on stdin and reads events as JSON lines on
stdout; nothing is ever unpickled. It dies with its parent (parent-death signal), and a closed
stdin (parent gone) ends it too: the episode in progress is discarded, the dataset stays loadable.

Two threads: the *receiver* drains every socket (never waits on the disk), cuts grid rows and
queues them; the *writer* (main thread) hands rows to lerobot (PNG staging by its image-writer
threads) and saves episodes. The queue between them holds rows in memory up to a budget, then
spills their images to a file on the dataset's disk, so a long encode never stalls receiving and
memory stays bounded.

Commands (stdin): start {task, t0_ns?, meta?}, save {t_end_ns?, meta?}, discard {},
intervention {on}, close {}. Events (stdout): ready, started {episode, index}, saved {episode,
index, frames, report, save_s, add_ms}, discarded {episode}, error {error, fatal}, closed {counters}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from armada.runtime.record.align import Aligner, EpisodeReport, Row
from armada.runtime.record.features import record_layout
from armada.runtime.record.store import DEFAULT_MIN_FREE_MB, DatasetSpec, DatasetStore, RecordError

log = logging.getLogger("armada.record")

# A row is settled this long after its instant plus half a period: frames arrive a few ms after
# capture (ipc), state messages within a tick; generous, since it only delays writing.
ARRIVAL_SLACK_NS = 150_000_000
DEFAULT_RAM_BUDGET_MB = 256
FRAME_HWM = 10_000  # messages; the receiver drains continuously, this only bounds a stall
STATE_HWM = 200_000
WRITER_NICE = 10


# --------------------------------------------------------------------------- row queue with spill


@dataclass
class SpilledRow:
    row: Row  # images replaced by {} until loaded back
    parts: list[tuple[str, int, tuple[int, ...], str]]  # camera, offset, shape, dtype


class SpillQueue:
    """FIFO between receiver and writer: rows in RAM up to a byte budget, then their images on disk."""

    def __init__(self, spill_dir: Path, ram_budget_bytes: int):
        self.q: queue.Queue = queue.Queue()
        self.budget = ram_budget_bytes
        self.ram_bytes = 0
        self.lock = threading.Lock()
        self.spill_dir = spill_dir
        self._file: Any = None
        self.spilled = 0

    def put_row(self, row: Row) -> None:
        size = sum(a.nbytes for a in row.images.values())
        with self.lock:
            in_ram = self.ram_bytes + size <= self.budget
            if in_ram:
                self.ram_bytes += size
        if in_ram:
            self.q.put(("row", row, size))
            return
        if self._file is None:
            # Unlinked at once (O_TMPFILE or unlink-after-create): nothing is left behind, even after kill -9.
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=self.spill_dir, prefix="armada-spill-")
        parts = []
        for cam, img in row.images.items():
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(np.ascontiguousarray(img).tobytes())
            parts.append((cam, offset, img.shape, img.dtype.str))
        self._file.flush()
        self.spilled += 1
        self.q.put(("spilled", SpilledRow(Row(row.index, row.t_ns, {}, row.observation, row.action,
                                              row.intervention), parts), 0))

    def put(self, kind: str, payload: Any = None) -> None:
        self.q.put((kind, payload, 0))

    def get(self, timeout: float | None = None) -> tuple[str, Any]:
        kind, payload, size = self.q.get(timeout=timeout)
        if size:
            with self.lock:
                self.ram_bytes -= size
        if kind == "spilled":
            images = {}
            for cam, offset, shape, dtype in payload.parts:
                n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                images[cam] = np.frombuffer(os.pread(self._file.fileno(), n, offset), dtype=dtype).reshape(shape)
            payload.row.images = images
            return "row", payload.row
        return kind, payload

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --------------------------------------------------------------------------- process


@dataclass
class Episode:
    id: int
    task: str
    meta: dict[str, Any] = field(default_factory=dict)
    failed: bool = False


class Events:
    def __init__(self, out: Any):
        self.out = out
        self.lock = threading.Lock()

    def emit(self, event: str, **data: Any) -> None:
        line = json.dumps({"event": event, **data}, default=_jsonable)
        with self.lock:
            try:
                self.out.write(line + "\n")
                self.out.flush()
            except (OSError, ValueError):
                pass  # the parent is gone: stdin's EOF ends us


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, EpisodeReport):
        return value.as_dict()
    return str(value)


class RecorderProcess:
    def __init__(self, cell: Any, store: DatasetStore, fps: int, events: Events, ram_budget_mb: float):
        self.cell = cell
        self.store = store
        self.events = events
        self.layout = record_layout(cell, fps)
        self.aligner = Aligner(list(self.layout.cameras), self.layout.drivers, self.layout.fps)
        self.ctl: queue.Queue = queue.Queue()
        # Beside the dataset (its root must not exist before lerobot creates it), on the same disk.
        self.rows = SpillQueue(store.spec.root.parent, int(ram_budget_mb * 1e6))
        self.stop = threading.Event()
        self.subscribed = threading.Event()
        self.ctx = zmq.Context()
        self.episode: Episode | None = None  # receiver side
        self.next_episode_id = 0
        self.add_ms: list[float] = []
        self.fatal: str | None = None
        self.closing = False
        self.deferred: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ receiver thread

    def receive(self) -> None:
        from armada.runtime.transport import FrameSubscriber, Subscriber

        cams = {FrameSubscriber(self.ctx, c.frames, hwm=FRAME_HWM, curve=self.cell.curve): c.name
                for c in self.cell.cameras}
        states = {Subscriber(self.ctx, d.state, curve=self.cell.curve, hwm=STATE_HWM): d.name
                  for d in self.cell.drivers}
        poller = zmq.Poller()
        for sub in [*cams, *states]:
            poller.register(sub.socket, zmq.POLLIN)
        by_socket = {s.socket: s for s in [*cams, *states]}
        self.subscribed.set()
        warned_missing = False
        try:
            while not self.stop.is_set():
                for sock, _ in poller.poll(20):
                    sub = by_socket[sock]
                    if sub in cams:
                        self._drain_frames(sub, cams[sub])
                    else:
                        self._drain_states(sub, states[sub])
                self._handle_control()
                now = time.time_ns()
                for row in self.aligner.due_rows(now, ARRIVAL_SLACK_NS):
                    if self.episode is not None and not self.episode.failed:
                        self.rows.put_row(row)
                if self.aligner.recording:
                    missing = self.aligner.missing_streams()
                    if missing and not warned_missing and now - (self.aligner.t0_ns or now) > 2e9:
                        warned_missing = True
                        self.events.emit("error", error=f"nothing received yet from {', '.join(missing)}: "
                                                        "no rows can be recorded", fatal=False)
                    overdue = self.aligner.t_end_ns is not None and now > self.aligner.t_end_ns + 2e9
                    if self.aligner.finished() or overdue:
                        self._end_episode()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, then we stop
            log.exception("receiver failed")
            self.fatal = f"the receiver failed: {exc!r}"
            self.events.emit("error", error=self.fatal, fatal=True)
            self.rows.put("close")
        finally:
            for sub in [*cams, *states]:
                sub.close()

    def _drain_frames(self, sub: Any, name: str) -> None:
        while sub.socket.poll(0, zmq.POLLIN):
            frame = sub.recv(0)
            if frame is not None:
                self.aligner.add_frame(name, frame.header, frame.pixels)

    def _drain_states(self, sub: Any, name: str) -> None:
        while sub.socket.poll(0, zmq.POLLIN):
            msg = sub.recv(0)
            if msg is not None and msg.get("kind") == "state":
                self.aligner.add_state(name, msg)

    def _handle_control(self) -> None:
        pending, self.deferred = self.deferred, []
        while True:
            try:
                pending.append(self.ctl.get_nowait())
            except queue.Empty:
                break
        for cmd in pending:
            kind = cmd.get("cmd")
            if self.closing:
                continue  # after close nothing starts; an episode never told to save would be discarded
            if self.episode is not None and self.aligner.t_end_ns is not None and kind != "close":
                # The episode before is still being cut (its last rows wait for late frames): what
                # follows belongs to the next one, whose start carries its own t0_ns.
                self.deferred.append(cmd)
                continue
            if kind == "start":
                if self.episode is not None:
                    self.events.emit("error", error="start: an episode is already being recorded", fatal=False)
                    continue
                self.episode = Episode(self.next_episode_id, str(cmd.get("task") or ""), dict(cmd.get("meta") or {}))
                self.next_episode_id += 1
                self.aligner.intervention = False
                self.aligner.start(int(cmd.get("t0_ns") or time.time_ns()))
                self.rows.put("begin", self.episode)
            elif kind == "save":
                if self.episode is None:
                    self.events.emit("error", error="save: no episode is being recorded", fatal=False)
                    continue
                self.episode.meta.update(cmd.get("meta") or {})
                self.aligner.stop(int(cmd.get("t_end_ns") or time.time_ns()))
            elif kind == "discard":
                if self.episode is not None:
                    self.aligner.abort()
                    self.rows.put("discard", self.episode)
                    self.episode = None
            elif kind == "intervention":
                self.aligner.intervention = bool(cmd.get("on"))
            elif kind == "meta" and self.episode is not None:
                self.episode.meta.update(cmd.get("meta") or {})
            elif kind == "close":
                if self.episode is not None and self.aligner.t_end_ns is None:
                    self.aligner.abort()  # never told to save: not a finished episode
                    self.rows.put("discard", self.episode)
                    self.episode = None
                self.closing = True  # an episode being saved is cut to its end first
        if self.closing and self.episode is None and not self.stop.is_set():
            self.rows.put("close")
            self.stop.set()

    def _end_episode(self) -> None:
        report = self.aligner.close_episode()
        ep, self.episode = self.episode, None
        if ep is not None:
            self.rows.put("end", (ep, report))

    # ------------------------------------------------------------------ writer (main thread)

    def write(self) -> int:
        current: Episode | None = None
        while True:
            kind, payload = self.rows.get()
            if kind == "close":
                break
            try:
                if kind == "begin":
                    current = payload
                    self.add_ms = []
                    index = self.store.begin()
                    self.events.emit("started", episode=current.id, index=index, recovered=self.store.recovered)
                    self.store.recovered = []
                elif kind == "row" and current is not None and not current.failed:
                    t = time.perf_counter()
                    self.store.add(payload, current.task)
                    self.add_ms.append((time.perf_counter() - t) * 1e3)
                    if payload.index % max(1, self.layout.fps) == 0:
                        self.store.check_disk()
                elif kind == "discard":
                    self.store.discard()
                    self.events.emit("discarded", episode=payload.id)
                    current = None
                elif kind == "end":
                    ep, report = payload
                    self._save(ep, report)
                    current = None
            except RecordError as exc:
                self._fail(str(exc))
            except Exception as exc:  # noqa: BLE001 - lerobot raised: say so, keep the dataset loadable
                log.exception("writing failed")
                self._fail(f"writing the dataset failed: {exc!r}")
            if self.fatal:
                break
        return 1 if self.fatal else 0

    def _save(self, ep: Episode, report: EpisodeReport) -> None:
        if self.store.ds is None or self.store.frames() == 0:
            self.store.discard()
            self.events.emit("error", error=f"episode {ep.id}: no frames were recorded (is every camera and "
                                            "driver publishing?); nothing saved", fatal=False)
            self.events.emit("discarded", episode=ep.id)
            return
        t = time.perf_counter()
        frames = self.store.frames()
        index = self.store.save({"task": ep.task, "report": report.as_dict(), **ep.meta})
        save_s = time.perf_counter() - t
        add = np.array(self.add_ms or [0.0])
        self.events.emit("saved", episode=ep.id, index=index, frames=frames, report=report.as_dict(),
                         save_s=save_s, add_ms={"median": float(np.median(add)), "p99": float(np.percentile(add, 99)),
                                                "max": float(add.max())},
                         spilled=self.rows.spilled)

    def _fail(self, error: str) -> None:
        self.fatal = error
        try:
            self.store.close()
        except Exception:  # noqa: BLE001 - already failing; the recovery marker covers the rest
            log.exception("discarding after an error failed")
        self.events.emit("error", error=error, fatal=True)
        self.stop.set()

    def counters(self) -> dict[str, Any]:
        a = self.aligner
        return {"frames": {c: vars(k) for c, k in a.frame_counters.items()},
                "states": {d: vars(k) for d, k in a.state_counters.items()}}


def _lower_writer_priority() -> None:
    """Nice this (the writer) thread: the PNG and encoder threads lerobot starts from it inherit it.
    The receiver and ZeroMQ's I/O thread, started before, keep theirs: on a busy host, receiving
    (and the cell's drivers and cameras) go first, encoding waits. Linux nice values are per thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (OSError, AttributeError):
        log.warning("could not lower the writer thread's priority; encoding competes with receiving")


def _read_stdin(ctl: queue.Queue) -> None:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        if isinstance(cmd, dict):
            ctl.put(cmd)
    ctl.put({"cmd": "close"})  # EOF: our parent is gone or done


def main(argv: list[str] | None = None) -> int:
    from armada.runtime.cli import die_with_parent
    from armada.runtime.config import load_cell

    die_with_parent()
    p = argparse.ArgumentParser(prog="armada-record-writer")
    p.add_argument("cell", type=Path)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--fps", type=int, default=None)
    p.add_argument("--min-free-mb", type=float, default=DEFAULT_MIN_FREE_MB)
    p.add_argument("--ram-budget-mb", type=float, default=DEFAULT_RAM_BUDGET_MB)
    p.add_argument("--image-writer-threads", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dataset: never reach for the Hub
    events = Events(sys.stdout)
    cell = load_cell(args.cell, args.run_dir)
    layout = record_layout(cell, args.fps)
    try:
        import lerobot.datasets.lerobot_dataset  # noqa: F401 - fail now, not at the first episode
        spec = DatasetSpec(args.repo_id, args.dataset.absolute(), layout.fps, layout.robot_type, layout.features(),
                           list(layout.cameras), args.image_writer_threads, args.min_free_mb)
        store = DatasetStore(spec)
        store.check_disk()
    except (RecordError, ImportError) as exc:
        events.emit("error", error=str(exc), fatal=True)
        return 1
    proc = RecorderProcess(cell, store, layout.fps, events, args.ram_budget_mb)

    def _close_on_signal(signum: int, _frame: Any) -> None:
        # Our parent died (parent-death signal) or we are asked to stop: episodes already told to
        # save are written out, the one in progress is discarded; the dataset stays loadable.
        proc.ctl.put({"cmd": "close", "signal": signum})

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _close_on_signal)
    threading.Thread(target=_read_stdin, args=(proc.ctl,), daemon=True, name="stdin").start()
    receiver = threading.Thread(target=proc.receive, daemon=True, name="receiver")
    receiver.start()
    proc.subscribed.wait(timeout=10)
    time.sleep(0.2)  # subscriptions take a moment to connect (slow joiner)
    _lower_writer_priority()
    events.emit("ready", fps=layout.fps, features=list(spec.features), robot_type=layout.robot_type,
                episodes=store.episodes_on_disk(), pid=os.getpid())
    code = proc.write()
    proc.stop.set()
    receiver.join(timeout=2)
    proc.rows.close()
    events.emit("closed", counters=proc.counters(), error=proc.fatal)
    return code


if __name__ == "__main__":
    sys.exit(main())
