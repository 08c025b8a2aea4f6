"""Operator side of the inference process: start and stop episodes, follow their events."""

from __future__ import annotations

import time
from typing import Any, Callable

import zmq

from armada.runtime.config import CellConfig
from armada.runtime.transport import CommandClient, Subscriber

OnEvent = Callable[[str, dict[str, Any]], None]


class EpisodeClient:
    def __init__(self, ctx: zmq.Context, cell: CellConfig):
        self.ctl = CommandClient(ctx, cell.inference.ctl, cell.curve, default_timeout_s=2.0)
        self.events = Subscriber(ctx, cell.inference.events, cell.curve)
        time.sleep(0.05)  # let the SUB connect so episode_started is not missed (PUB drops early messages)

    def start(self, instruction: str, duration_s: float | None = None, arm: bool = False,
              task: str | None = None, min_margin: float | None = None) -> int:
        fields: dict[str, Any] = {"instruction": instruction, "arm": arm}
        if duration_s is not None:
            fields["duration_s"] = duration_s
        if task is not None:
            fields["task"] = task
        if min_margin is not None:
            fields["min_margin"] = min_margin
        return self.ctl.request("episode_start", **fields)["episode"]

    def stop(self, reason: str = "operator") -> None:
        self.ctl.request("episode_stop", reason=reason)

    def intervene(self) -> int:
        """Take over the running episode: the inference side stops sending chunks and releases
        every driver's lease (the drivers hold). Returns the episode; RemoteError BAD_STATE if none runs."""
        return self.ctl.request("intervene")["episode"]

    def resume(self) -> float:
        """Hand the episode back; returns the seconds it was intervened. RemoteError BAD_STATE,
        naming the holder, while anyone else still holds a driver's lease."""
        return self.ctl.request("resume")["intervened_s"]

    def wait_report(self, episode: int, timeout_s: float, on_event: OnEvent | None = None) -> dict[str, Any]:
        """Follow events until this episode's report arrives; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.events.recv(min(0.5, max(0.0, deadline - time.monotonic())))
            if msg is None:
                status = self.ctl.request("status")
                report = status.get("last_report")
                if not status["running"] and report and report["episode"] == episode:
                    return report  # the ended event was missed; the status has it
                continue
            data = msg.get("data") or {}
            if on_event is not None:
                on_event(msg["event"], data)
            if msg["event"] == "episode_ended" and data.get("episode") == episode:
                return data
        raise TimeoutError(f"episode {episode} did not end within {timeout_s:.0f} s")

    def close(self) -> None:
        self.ctl.close()
        self.events.close()
