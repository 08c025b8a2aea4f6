"""Intervention: during an autonomous episode the operator takes the arm over and hands it back.

Take over: ``intervene`` on the inference process's ctl socket (it stops sending chunks, releases
its leases, the drivers decelerate to a hold, the episode stays open), then the teleop session
engages as always: lease (retried while the inference lets go), ramped move to the leader's pose,
the operator's confirmation, following. Hand back: stop following, release the lease (the driver
decelerates to a hold) and ``resume`` (the inference re-acquires and continues the episode). No
jump either way: the ramped move before following, and the driver holds in between.
"""

from __future__ import annotations

from typing import Any, Callable

import zmq

from armada.runtime.config import CellConfig
from armada.runtime.teleop.session import TeleopError, TeleopSession
from armada.runtime.transport import CommandClient, RemoteError

# How long the lease may still be held by the inference process after it answered ``intervene``.
ACQUIRE_WAIT_S = 2.0


class Intervention:
    def __init__(self, cell: CellConfig, sessions: list[TeleopSession], ctx: zmq.Context,
                 say: Callable[[str], None] = print):
        self.sessions = sessions
        self.say = say
        self.ctl = CommandClient(ctx, cell.inference.ctl, cell.curve, default_timeout_s=2.0)
        self.active = False
        for s in sessions:
            s.acquire_wait_s = max(s.acquire_wait_s, ACQUIRE_WAIT_S)

    def _ctl(self, kind: str) -> dict[str, Any]:
        try:
            return self.ctl.request(kind)
        except TimeoutError:
            raise TeleopError(f"the inference process does not answer {kind} on its ctl socket: is `armada run` "
                              "(or `armada infer`) running on this cell?") from None
        except RemoteError as exc:
            if exc.code == "unknown_kind":
                raise TeleopError(f"the inference process does not know {kind!r} (it predates interventions): "
                                  "update armada on the robot PC") from None
            if exc.code == "bad_state":
                raise TeleopError(f"{kind} refused: {exc.reason}") from None
            raise TeleopError(f"{kind} refused: {exc.code}: {exc.reason}") from None

    def take_over(self, confirm: Callable[[str], bool]) -> dict[str, Any]:
        """Pause the episode's policy and engage teleop on every follower."""
        reply = self._ctl("intervene")
        self.active = True
        self.say(f"intervention: episode {reply.get('episode', '?')} paused; the policy released the arm(s)")
        for s in self.sessions:
            s.engage(confirm)
        return reply

    def hand_back(self) -> dict[str, Any]:
        """Stop following, release every lease, and let the policy continue the episode."""
        for s in self.sessions:
            s.release()
        reply = self._ctl("resume")
        self.active = False
        self.say(f"intervention: handed back; episode {reply.get('episode', '?')} continues")
        return reply

    def close(self) -> None:
        self.ctl.close()
