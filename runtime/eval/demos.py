"""Stage 1: expert demonstrations through the real recorder, successful ones only.

The cell runs with the scripted expert (policy ``sim_expert``) and the recorder process
(runtime/record/writer.py), followed exactly as `armada run --record` follows it
(AutonomousRecorder), with one difference: when an episode ends, the recorder is told ``save``
only if the sim reported success during it, else ``discard`` (the writer drops the episode; the
dataset never holds it). Each task is recorded with fresh seeds until ``--demos`` succeed, at most
``DEMO_ATTEMPTS_FACTOR x --demos`` attempts; the summary says how many were dropped.
So the dataset holds successful demos only and training needs no episode filter.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from armada.runtime.eval.plan import EvalPlan, SimTask
from armada.runtime.eval.progress import Progress
from armada.runtime.record.autonomous import AutonomousRecorder

DECISION_WAIT_S = 5.0  # after an episode's report, its save/discard decision follows within this
REPO_ID = "local/eval-demos"
# Longer than `armada run`'s: on a small machine the renderers, the recorder and a model import
# compete for the same cores while they start.
START_TIMEOUT_S = 60.0


class JudgedRecorder(AutonomousRecorder):
    """AutonomousRecorder that saves an episode only when it was judged a success (``keep``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.lock = threading.Lock()
        self.keep: dict[int, dict[str, Any]] = {}  # inference episode -> metadata of a success
        self.decisions: dict[int, str] = {}  # inference episode -> "saved" | "discarded"
        super().__init__(*args, **kwargs)

    def judge(self, episode: int, meta: dict[str, Any]) -> None:
        """Called (from the episode loop) when the sim reports success: this episode is kept."""
        with self.lock:
            self.keep[episode] = meta

    def _on_event(self, event: str, data: dict[str, Any], t_ns: int) -> None:
        if event != "episode_ended" or not self.in_episode:
            super()._on_event(event, data, t_ns)
            return
        episode = int(data.get("episode", -1))
        with self.lock:
            meta = self.keep.get(episode)
        if meta is not None:
            self.recorder.send("save", t_end_ns=t_ns, meta={"inference_report": data, "eval": meta})
            decision = "saved"
        else:
            self.recorder.send("discard")
            decision = "discarded"
        self.in_episode = False
        with self.lock:
            self.decisions[episode] = decision

    def decision(self, episode: int, timeout_s: float = DECISION_WAIT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if episode in self.decisions:
                    return self.decisions[episode]
            if self.error is not None:
                raise RuntimeError(f"the recorder stopped: {self.error}")
            time.sleep(0.02)
        raise RuntimeError(f"the recorder did not see episode {episode} end within {timeout_s:.0f} s")


def record_demos(plan: EvalPlan, cell_path: Path, run_dir: Path, sim_driver: str, control_endpoint: str,
                 dataset: Path) -> dict[str, Any]:
    """Record every task's demos; returns the stage summary (kept/dropped per task, seeds)."""
    from armada.drivers.sim.control import SimControl
    from armada.runtime.eval.episodes import EvalError, SimEpisodes
    from armada.runtime.supervisor import CellProcesses

    summary: dict[str, Any] = {"dataset": str(dataset), "repo_id": REPO_ID, "tasks": {}, "episodes": []}
    with CellProcesses(cell_path, run_dir) as procs:
        start_processes(procs)
        recorder = JudgedRecorder.start(procs, dataset, REPO_ID)
        control = SimControl(control_endpoint.replace("{run_dir}", str(procs.run_dir)), 2.0)
        episodes = SimEpisodes(procs, sim_driver, control)
        try:
            attempt = 0
            for task in plan.tasks:
                attempt = _record_task(plan, task, episodes, recorder, summary, attempt)
        finally:
            episodes.close()
            control.close()
            recorder.close()
    kept = sum(t["kept"] for t in summary["tasks"].values())
    if kept == 0:
        raise EvalError("no expert demonstration succeeded: nothing to train on")
    return summary


def _record_task(plan: EvalPlan, task: SimTask, episodes: Any, recorder: JudgedRecorder,
                 summary: dict[str, Any], attempt: int) -> int:
    progress = Progress(f"demos {task.name}", plan.demos)
    kept = dropped = 0
    first_seed = plan.demo_seed(attempt)
    tries = 0
    while kept < plan.demos and tries < plan.max_demo_attempts:
        seed = plan.demo_seed(attempt)
        attempt += 1
        tries += 1

        def on_success(episode: int, seed: int = seed) -> None:
            recorder.judge(episode, {"sim_task": task.name, "seed": seed})

        result = episodes.run(task, seed, "expert-demo", plan.duration_s, on_success=on_success)
        decision = recorder.decision(result.episode)
        kept += decision == "saved"
        dropped += decision != "saved"
        summary["episodes"].append(result.as_dict() | {"recorded": decision})
        progress.total = plan.demos + dropped  # attempts at best: every one from now on succeeds
        progress.step(decision == "saved", f"seed {seed}: {'kept' if decision == 'saved' else 'dropped'} "
                      f"({result.outcome}, kept {kept}/{plan.demos})")
    summary["tasks"][task.name] = {"instruction": task.instruction, "kept": kept, "dropped": dropped,
                                   "attempts": tries, "seeds": [first_seed, plan.demo_seed(attempt - 1)]}
    print(f"demos {task.name}: {kept} kept, {dropped} failed demo(s) dropped", flush=True)
    if kept < plan.demos:
        print(f"demos {task.name}: only {kept} of {plan.demos} succeeded in {tries} attempts", flush=True)
    return attempt


def start_processes(procs: Any) -> None:
    t = time.monotonic()
    print(f"eval: starting {procs.cell.name} in {procs.run_dir} ...", flush=True)
    try:
        procs.start_all(timeout_s=START_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"the cell's processes did not start: {exc}") from None
    print(f"eval: all processes answer ({time.monotonic() - t:.1f} s); logs in {procs.run_dir / 'logs'}", flush=True)
