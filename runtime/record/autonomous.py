"""`armada run --record DIR`: every autonomous episode of the running cell, recorded.

The recorder process (runtime/record/writer.py) receives the frames and states itself; this side
follows the inference events and tells it when episodes start and end:

- ``episode_started`` {episode, instruction}: an episode starts at the event's stamp; the task
  string stored with every frame is the instruction given to the policy;
- ``route`` {task, scores, probabilities, margin}: kept for the episode's metadata;
- ``intervention_started`` / ``intervention_ended``: the per-frame ``intervention`` flag;
- ``episode_ended`` {report}: the episode ends at the event's stamp and is saved.

Per-episode metadata (routed task, router scores and probabilities, the inference report, the
recorder's own report) is in ``meta/armada_episodes.jsonl`` keyed by ``episode_index``
(lerobot's meta/episodes columns are fixed: see runtime/record/store.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from armada.runtime.record.client import RecorderClient, RecorderError

SAVE_WAIT_S = 120.0


class AutonomousRecorder:
    """Records every episode of a running cell (following the inference events) to a dataset."""

    def __init__(self, procs: Any, recorder: RecorderClient, dataset: Path):
        from armada.runtime.transport import Subscriber

        self.procs = procs
        self.recorder = recorder
        self.dataset = dataset
        self.events = Subscriber(procs.ctx, procs.cell.inference.events, curve=procs.cell.curve, hwm=10_000)
        self.stop = threading.Event()
        self.in_episode = False
        self.started = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._follow, daemon=True, name="autonomous-recorder")
        self.thread.start()

    @classmethod
    def start(cls, procs: Any, dataset: Path, repo_id: str | None) -> "AutonomousRecorder":
        dataset = Path(dataset).absolute()
        recorder = RecorderClient(procs.cell_path, procs.run_dir, dataset, repo_id or f"local/{dataset.name}")
        try:
            ready = recorder.wait_ready()
        except RecorderError as exc:
            recorder.close(timeout_s=5)
            raise SystemExit(f"armada run --record: the recorder did not start: {exc}") from None
        print(f"armada: recording every episode to {dataset} at {ready['fps']} fps "
              f"({ready['episodes']} episode(s) there already)", flush=True)
        return cls(procs, recorder, dataset)

    def _follow(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.events.recv(0.1)
                if msg is not None and msg.get("kind") == "event":
                    self._on_event(msg["event"], msg.get("data") or {}, int(msg["t_ns"]))
        except RecorderError as exc:
            self.error = str(exc)
            print(f"armada: recording stopped: {exc}", flush=True)

    def _on_event(self, event: str, data: dict[str, Any], t_ns: int) -> None:
        send = self.recorder.send
        if event == "episode_started":
            if self.in_episode:  # an end we never saw: close it where the new one starts
                send("save", t_end_ns=t_ns, meta={"outcome_note": "no episode_ended seen"})
            task = str(data.get("instruction") or "")
            send("start", task=task, t0_ns=t_ns, meta={"source": "armada run", "inference_episode": data.get("episode"),
                                                       "instruction": task})
            self.in_episode = True
            self.started += 1
        elif event == "route" and self.in_episode:
            send("meta", meta={"routed_task": data.get("task"), "router": {
                k: data.get(k) for k in ("scores", "probabilities", "margin")}})
        elif event == "intervention_started" and self.in_episode:
            send("intervention", on=True)
        elif event == "intervention_ended" and self.in_episode:
            send("intervention", on=False)
        elif event == "episode_ended" and self.in_episode:
            send("save", t_end_ns=t_ns, meta={"inference_report": data})
            self.in_episode = False

    def close(self) -> None:
        """Waits for the last episode to be written, then stops the recorder; prints where."""
        time.sleep(0.3)  # the last episode_ended event is still on its way
        self.stop.set()
        self.thread.join(timeout=2)
        self.events.close()
        code = self.recorder.close(timeout_s=SAVE_WAIT_S)
        saved, errors = [], []
        for ev in self.recorder.poll_events():
            if ev["event"] == "saved":
                saved.append(ev)
            elif ev["event"] == "error":
                errors.append(ev["error"])
        for ev in saved:
            rep = ev["report"]
            lost = sum(rep["frames_lost"].values()) + sum(rep["camera_drops"].values()) + sum(rep["states_lost"].values())
            print(f"armada: recorded episode {ev['index']}: {ev['frames']} frames, {lost} lost", flush=True)
        for err in errors:
            print(f"armada: recorder: {err}", flush=True)
        print(f"armada: {len(saved)} of {self.started} episode(s) recorded to {self.dataset}"
              f"{'' if code == 0 else f' (the recorder exited with code {code}; see {self.recorder.log_path})'}",
              flush=True)
