"""`armada record CELL --dataset DIR --task "..."`: the operator's recording session.

Starts the cell's drivers and cameras unless they already answer (never the inference process),
starts the recorder process (runtime/record/writer.py), optionally teleoperation
(runtime/teleop/session.py), then loops: warm-up, episode, reset, ... Keys (terminal, cbreak):

    right arrow / n   end the episode now and save it (in the reset: skip the rest of the reset)
    left arrow / r    discard this episode and record it again
    esc / q           save the episode in progress and stop

Without a terminal (a pipe, a script) there are no keys: episodes run their full time.
Exit codes: 0 all episodes recorded, 1 recording failed (disk full, a process died), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from armada.runtime.terminal import TerminalKeys

RUN_DIR_HELP = "private folder for ipc sockets, locks and logs (default: the cell's default run dir)"


def add_record_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record demonstrations to a LeRobotDataset v3")
    p.add_argument("cell", type=Path, help="cell YAML")
    p.add_argument("--dataset", type=Path, required=True, metavar="DIR", help="dataset folder (created, or --resume)")
    p.add_argument("--repo-id", default=None, help="dataset repo id (default: local/<folder name>)")
    p.add_argument("--task", required=True, help="the task string stored with every frame")
    p.add_argument("--episodes", type=int, default=10, help="episodes to record (default 10)")
    p.add_argument("--episode-time", type=float, default=60.0, metavar="S", help="seconds per episode (default 60)")
    p.add_argument("--reset-time", type=float, default=15.0, metavar="S",
                   help="seconds to reset the scene between episodes (default 15)")
    p.add_argument("--warmup", type=float, default=5.0, metavar="S", help="seconds before the first episode")
    p.add_argument("--resume", action="store_true", help="add episodes to an existing dataset")
    p.add_argument("--teleop", choices=["leader", "keyboard", "none"], default="none",
                   help="teleoperate while recording (leader: a leader arm read by the driver)")
    p.add_argument("--driver", default=None, help="the driver to teleoperate (cells with several)")
    p.add_argument("--arm", action="store_true", help="teleop may arm a real robot (see armada teleop)")
    p.add_argument("--yes", action="store_true", help="do not ask before following the leader")
    p.add_argument("--view", default=None, metavar="MODE", help="a live rerun view: spawn, serve or save:FILE.rrd")
    p.add_argument("--fps", type=int, default=None, help="recording fps (default: the cameras' fps)")
    p.add_argument("--min-free-mb", type=float, default=None,
                   help="stop recording when the dataset's disk has less free space (default 1024)")
    p.add_argument("--run-dir", type=Path, default=None, help=RUN_DIR_HELP)


def run_record(args: argparse.Namespace) -> int:
    session = RecordSession(args)
    try:
        return session.main()
    finally:
        session.close()


def _say(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


# --------------------------------------------------------------------------- keys


KEY_NEXT, KEY_RERECORD, KEY_STOP = "next", "rerecord", "stop"


def parse_keys(data: bytes) -> list[str]:
    """Terminal bytes to actions: arrows come as ESC [ C / ESC [ D; a lone ESC is stop."""
    out: list[str] = []
    i = 0
    while i < len(data):
        if data[i:i + 3] == b"\x1b[C" or data[i:i + 3] == b"\x1bOC":
            out.append(KEY_NEXT)
            i += 3
            continue
        if data[i:i + 3] == b"\x1b[D" or data[i:i + 3] == b"\x1bOD":
            out.append(KEY_RERECORD)
            i += 3
            continue
        if data[i:i + 2] in (b"\x1b[", b"\x1bO"):  # another escape sequence (up arrow, ...): ignored
            i += 3
            continue
        ch = data[i:i + 1]
        if ch in (b"n", b"N"):
            out.append(KEY_NEXT)
        elif ch in (b"r", b"R"):
            out.append(KEY_RERECORD)
        elif ch in (b"q", b"Q", b"\x1b"):
            out.append(KEY_STOP)
        i += 1
    return out


# --------------------------------------------------------------------------- session


class RecordSession:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.procs: Any = None
        self.recorder: Any = None
        self.teleop: Any = None
        self.viewer: Any = None
        self.saved: list[dict[str, Any]] = []
        self.failed: str | None = None
        self.ctx: Any = None

    # ------------------------------------------------------------------ setup

    def main(self) -> int:
        from armada.runtime.config import load_cell
        from armada.runtime.record.store import DEFAULT_MIN_FREE_MB, disk_free_mb, is_dataset
        from armada.runtime.rundir import resolve_run_dir

        a = self.args
        if a.episodes < 1 or a.episode_time <= 0 or a.reset_time < 0 or a.warmup < 0:
            _say("armada record: --episodes must be >= 1, --episode-time > 0, --reset-time and --warmup >= 0")
            return 2
        dataset = a.dataset.absolute()
        if is_dataset(dataset) and not a.resume:
            _say(f"armada record: {dataset} already holds a dataset: pass --resume to add episodes, or choose "
                 "a new folder")
            return 2
        if dataset.exists() and not is_dataset(dataset) and any(dataset.iterdir()):
            _say(f"armada record: {dataset} exists and is not a LeRobot dataset: choose a new folder")
            return 2
        min_free = a.min_free_mb if a.min_free_mb is not None else DEFAULT_MIN_FREE_MB
        free = disk_free_mb(dataset)
        if free < min_free:  # before starting anything; the recorder checks again before and during episodes
            _say(f"armada record: disk nearly full: {free:.0f} MB free under {dataset}, the minimum is "
                 f"{min_free:.0f} MB (--min-free-mb); nothing recorded")
            return 1
        cell = load_cell(a.cell)
        run_dir = resolve_run_dir(a.run_dir, cell.name)
        repo_id = a.repo_id or f"local/{dataset.name}"
        if not self._start_processes(a.cell, run_dir, cell):
            return 1
        cell = load_cell(a.cell, run_dir)
        if not self._start_recorder(a.cell, run_dir, dataset, repo_id):
            return 1
        if a.view:
            self._start_view(a.cell, run_dir, a.view)
        if a.teleop != "none" and not self._start_teleop(cell):
            return 1
        with TerminalKeys(parse_keys) as keys:
            if not keys.interactive:
                _say("armada record: stdin is not a terminal: no keys; every episode runs its full time")
            else:
                _say("armada record: keys: right arrow/n next, left arrow/r re-record, esc/q stop")
            self._loop(keys)
        return self._finish()

    def _start_processes(self, cell_path: Path, run_dir: Path, cell: Any) -> bool:
        import zmq

        from armada.runtime.supervisor import CellProcesses

        self.ctx = zmq.Context()
        cell_here = _load(cell_path, run_dir)
        missing = [("driver", d.name) for d in cell_here.drivers if not _driver_answers(self.ctx, cell_here, d.name)]
        missing += [("camera", c.name) for c in cell_here.cameras if not _camera_answers(self.ctx, cell_here, c)]
        if not missing:
            _say(f"armada record: the cell's {len(cell.drivers)} driver(s) and {len(cell.cameras)} camera(s) "
                 "already run; recording from them")
            return True
        _say(f"armada record: starting {', '.join(f'{r} {n}' for r, n in missing)} in {run_dir} ...")
        try:
            self.procs = CellProcesses(cell_path, run_dir)
            for role, name in missing:
                self.procs.spawn(role, name)
            self.procs.wait_ready(30.0)
        except (RuntimeError, TimeoutError) as exc:
            _say(f"armada record: {exc}")
            return False
        _say(f"armada record: processes answer; logs in {run_dir / 'logs'}")
        return True

    def _start_recorder(self, cell_path: Path, run_dir: Path, dataset: Path, repo_id: str) -> bool:
        from armada.runtime.record.client import RecorderClient, RecorderError

        a = self.args
        self.recorder = RecorderClient(cell_path, run_dir, dataset, repo_id, fps=a.fps, min_free_mb=a.min_free_mb)
        try:
            ready = self.recorder.wait_ready()
        except RecorderError as exc:
            _say(f"armada record: the recorder did not start: {exc}")
            self.failed = str(exc)
            return False
        _say(f"armada record: recording {ready['robot_type']} at {ready['fps']} fps to {dataset} ({repo_id}); "
             f"{ready['episodes']} episode(s) already there")
        return True

    def _start_view(self, cell_path: Path, run_dir: Path, mode: str) -> None:
        try:
            from armada.runtime.view import start_view

            self.viewer = start_view(cell_path, run_dir, mode)
        except (ImportError, RuntimeError, SystemExit) as exc:
            _say(f"armada record: no live view ({exc}); recording without it")

    def _start_teleop(self, cell: Any) -> bool:
        a = self.args
        try:
            from armada.runtime.teleop.session import TeleopError, TeleopSession
            from armada.runtime.teleop.sources import KeyboardSource, LeaderSource
        except ImportError as exc:
            _say(f"armada record: teleoperation is not available ({exc}); recording with --teleop none")
            return True
        if a.teleop == "keyboard":
            # Our keys (next/re-record/stop) and keyboard jogging would share one terminal.
            _say("armada record: --teleop keyboard would share the terminal with the recording keys: jog with "
                 "`armada teleop --source keyboard` in another terminal and record with --teleop none")
            return False
        try:
            self.teleop = TeleopSession(cell, a.driver, LeaderSource() if a.teleop == "leader" else KeyboardSource(),
                                        ctx=self.ctx, say=_say, arm=a.arm)
            self.teleop.engage(self._confirm)
        except (TeleopError, RuntimeError, TimeoutError) as exc:
            _say(f"armada record: teleoperation did not engage: {exc}")
            return False
        _say(f"armada record: teleop {self.teleop.status}")
        return True

    def _confirm(self, question: str) -> bool:
        if self.args.yes:
            _say(f"{question} yes (--yes)")
            return True
        if not sys.stdin.isatty():
            _say(f"{question} no terminal to answer: pass --yes")
            return False
        answer = input(f"{question} [y/N] ").strip().lower()
        return answer in ("y", "yes")

    # ------------------------------------------------------------------ the operator's loop

    def _loop(self, keys: TerminalKeys) -> None:
        a = self.args
        if a.warmup > 0:
            _say(f"armada record: warm-up {a.warmup:.0f} s")
            if self._wait(keys, a.warmup, "warm-up", allow_skip=True) == KEY_STOP:
                return
        done = 0
        while done < a.episodes and self.failed is None:
            _say(f"\narmada record: recording episode {done + 1}/{a.episodes}: {a.task!r}")
            try:
                self.recorder.send("start", task=a.task, t0_ns=time.time_ns(), meta={"source": "armada record"})
            except Exception as exc:  # noqa: BLE001 - the recorder is gone
                self.failed = str(exc)
                break
            key = self._wait(keys, a.episode_time, f"episode {done + 1}/{a.episodes}", allow_skip=True)
            if key == KEY_RERECORD:
                self.recorder.send("discard")
                _say(f"armada record: episode {done + 1} discarded; reset the scene, then it is recorded again")
                if self._reset(keys) == KEY_STOP:
                    break
                continue
            if self.failed is not None:
                break
            self.recorder.send("save", t_end_ns=time.time_ns(), meta={"teleop": a.teleop})
            done += 1
            if key == KEY_STOP:
                _say("armada record: stopping after this episode")
                break
            if done < a.episodes and self._reset(keys) == KEY_STOP:
                break

    def _reset(self, keys: TerminalKeys) -> str | None:
        if self.args.reset_time <= 0:
            return None
        _say(f"armada record: reset the scene ({self.args.reset_time:.0f} s; right arrow/n when ready)")
        return self._wait(keys, self.args.reset_time, "reset", allow_skip=True)

    def _wait(self, keys: TerminalKeys, seconds: float, label: str, allow_skip: bool) -> str | None:
        """Waits, showing progress and what the recorder says; returns the key that ended it early."""
        t0 = time.monotonic()
        last_line = 0.0
        while True:
            left = seconds - (time.monotonic() - t0)
            if left <= 0:
                return None
            for key in keys.read(min(0.1, left)):
                if key == KEY_NEXT and allow_skip:
                    return KEY_NEXT
                if key in (KEY_RERECORD, KEY_STOP):
                    if key == KEY_RERECORD and label.startswith("episode"):
                        return key
                    if key == KEY_STOP:
                        return key
            self._events()
            if self.failed is not None:
                return KEY_STOP
            now = time.monotonic()
            if now - last_line >= (0.5 if keys.interactive else 5.0):
                last_line = now
                line = f"  {label}: {now - t0:5.1f}/{seconds:.0f} s   saved so far: {len(self.saved)}"
                if self.teleop is not None:
                    line += f"   teleop: {self.teleop.status}"
                if keys.interactive:
                    print("\r" + line.ljust(78), end="", flush=True)
                else:
                    _say(line)

    def _events(self) -> None:
        for ev in self.recorder.poll_events():
            kind = ev["event"]
            if kind == "saved":
                self.saved.append(ev)
                rep = ev["report"]
                _say(f"\narmada record: saved episode {ev['index']} ({ev['frames']} frames, encoded in "
                     f"{ev['save_s']:.1f} s): {_summary(rep)}")
            elif kind == "started" and ev.get("recovered"):
                _say(f"\narmada record: recovered the dataset: {'; '.join(ev['recovered'])}")
            elif kind == "error":
                _say(f"\narmada record: {'ERROR: ' if ev.get('fatal') else ''}{ev['error']}")
                if ev.get("fatal"):
                    self.failed = ev["error"]
            elif kind == "exited" and self.failed is None and ev["code"] != 0:
                self.failed = f"the recorder process exited ({ev['code']}); see {self.recorder.log_path}"
                _say(f"\narmada record: {self.failed}")

    # ------------------------------------------------------------------ the end

    def _finish(self) -> int:
        from armada.runtime.record.store import is_dataset

        if self.teleop is not None:
            with contextlib.suppress(Exception):
                self.teleop.close()
            self.teleop = None
        _say("\narmada record: writing the last episode ..." if self.failed is None else "")
        code = self.recorder.close()
        self._events()
        if code != 0 and self.failed is None:
            self.failed = f"the recorder exited with code {code}; see {self.recorder.log_path}"
        dataset = self.args.dataset.absolute()
        total = 0
        if is_dataset(dataset):
            import json

            total = json.loads((dataset / "meta" / "info.json").read_text())["total_episodes"]
        lost = sum(_lost(ev["report"]) for ev in self.saved)
        _say(f"armada record: {len(self.saved)} episode(s) saved this session, {total} in {dataset}; "
             f"{lost} frame(s)/state(s) lost")
        if self.failed is not None:
            _say(f"armada record: FAILED: {self.failed}")
            return 1
        return 0

    def close(self) -> None:
        if self.teleop is not None:
            with contextlib.suppress(Exception):
                self.teleop.close()
        if self.recorder is not None:
            self.recorder.close()
        if self.viewer is not None:
            with contextlib.suppress(Exception):
                self.viewer.close()
        if self.procs is not None:
            self.procs.close()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)


def _lost(rep: dict[str, Any]) -> int:
    return sum(rep["frames_lost"].values()) + sum(rep["camera_drops"].values()) + sum(rep["states_lost"].values())


def _summary(rep: dict[str, Any]) -> str:
    gaps = sum(rep["frame_gaps"].values()) + sum(rep["state_gaps"].values())
    lost = _lost(rep)
    text = "nothing lost" if lost == 0 else (f"LOST frames {rep['frames_lost']} camera drops {rep['camera_drops']} "
                                             f"states {rep['states_lost']}")
    if gaps:
        text += f"; gaps (no sample within half a period) frames {rep['frame_gaps']} states {rep['state_gaps']}"
    return text


def _load(cell_path: Path, run_dir: Path) -> Any:
    from armada.runtime.config import load_cell

    return load_cell(cell_path, run_dir)


def _driver_answers(ctx: Any, cell: Any, name: str) -> bool:
    from armada.runtime.supervisor import answers_hello

    return answers_hello(ctx, cell.driver(name).cmd, cell.curve, "record-probe")


def _camera_answers(ctx: Any, cell: Any, cam: Any) -> bool:
    from armada.runtime.transport import FrameSubscriber

    sub = FrameSubscriber(ctx, cam.frames, curve=cell.curve)
    try:
        return sub.recv(0.5) is not None
    finally:
        sub.close()

