"""One follower arm under teleoperation: engage safely, follow a source at the driver's rate, hold.

Engaging (``engage``): take the driver's control lease (retrying briefly while another holder
lets go, as during an intervention), arm the driver only where allowed (a cell that moves no real
hardware, or the operator's --arm), make a ramped ``move_to`` to the source's pose and wait until
the follower is measured there, ask the operator to confirm, then follow: a thread sends the
source's pose every period (the follower's control rate, at most 100 Hz) as a one-point timed
trajectory on a steady time grid, two periods ahead. Every target goes through the driver's safety
filter (limits, velocity, acceleration), is refused beyond max_engage_distance like a servo target
(TOO_FAR: teleop then holds), and renews the lease. Following starts with a blend-in (the source
moved on while the operator confirmed: it is approached at move_to's fractions of the limits); a
source faster than the follower is sent at most half the engage distance ahead of the commanded
pose (the follower catches up at its own limits); a source that jumps more than the engage distance
in one period is a broken reading, and teleop holds.

Why not ``servo``: the driver reaches each servo target over SERVO_INTERPOLATION_S starting again
from the filter's pose at every new target, so a stream's progress per period depends on where the
target lands between the driver's ticks. On a 50 Hz driver (SO-101) that made the follower lag a
1.2 rad/s leader by over 0.3 rad (TOO_FAR, measured on the SO-101 fake); at 500 Hz servos a 1.6
rad/s leader got about 0.5 rad/s. Timed points on a grid are played at their times whatever the
phase: the follower runs a constant two periods behind the source.

Holding: whenever following stops (the leader is lost, the driver refuses a target, the operator
holds) no more targets are sent and the driver plays the last one (each is marked final) and holds
there, armed. Nothing resumes by itself: following again needs ``engage`` again (a ramped move to where
the source is now, and the operator's confirmation), so the follower never jumps.

The lease while holding is kept alive by heartbeats from the same thread, so no other controller
can take the arm from under the operator mid-session, and re-engaging does not race anyone. If
this process dies, the heartbeats stop, the lease lapses after the cell's ``lease_ttl_s`` and the
driver decelerates to a hold on its own.

Sources that follow in hardware (Cobot Magic's puppets obey their masters on the CAN bus: state
``device["leader_follows_in_hardware"]``) are only watched: no lease, no targets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zmq

from armada.drivers.core.registry import moves_no_hardware
from armada.runtime.config import CellConfig
from armada.runtime.protocol import PROTOCOL_VERSION
from armada.runtime.teleop.sources import (BaseSource, Bounds, LeaderSource, StateFeed, TargetSource,
                                           leader_source)
from armada.runtime.transport import CommandClient, RemoteError

__all__ = ["TeleopError", "TeleopSession", "LeaderSource", "leader_source"]

# No state from the driver for this many of its ticks, and at least MIN_SILENCE_S, is a lost leader
# (its reading comes in that stream). The floor: a loaded 2-core host stalled a receiving thread for
# over 100 ms now and then in the HIL tests; a false "lost" holds the arm, safe but annoying.
SILENCE_TICKS = 5
MIN_SILENCE_S = 0.25
# Consecutive targets without a reply (or late) before following stops.
MAX_SERVO_TIMEOUTS = 3
SERVO_TIMEOUT_S = 0.2
# A target later than this many periods after the previous one: this process stalled.
STALL_PERIODS = 3
MAX_FOLLOW_RATE_HZ = 100.0
# A target is never sent further than this fraction of max_engage_distance ahead of the commanded pose.
REACH_FRACTION = 0.5
# Each target is stamped this many periods ahead of now (driver clock): it arrives before its
# segment starts playing even when the request is a period late.
LEAD_PERIODS = 2
# Arrival after a move_to: measured within this many joint units, or 2 % of the joint's range if smaller.
ARRIVE_TOLERANCE = 0.05
ARRIVE_RANGE_FRACTION = 0.02
# Slack on top of the planned move time before the arrival check gives up.
ARRIVE_SLACK_S = 3.0


def follow_rate_hz(control_rate_hz: float) -> float:
    """How often teleop sends a target: the follower's control rate, at most MAX_FOLLOW_RATE_HZ
    (the driver interpolates between the points; faster buys little latency for much CPU)."""
    return min(float(control_rate_hz), MAX_FOLLOW_RATE_HZ)


class TeleopError(RuntimeError):
    """Teleop cannot engage (or go on): the reason says what and what to do."""


@dataclass
class LoopStats:
    """Servo timing as sent from here: intervals between sends and request round trips."""

    intervals_s: deque = field(default_factory=lambda: deque(maxlen=200_000))
    rtts_s: deque = field(default_factory=lambda: deque(maxlen=200_000))
    sent: int = 0
    refused: int = 0
    timeouts: int = 0
    stalls: int = 0  # periods missed here (a stalled host): followed by a blend-in
    late: int = 0  # targets that reached the driver after their time (skipped)
    reach_limited: int = 0  # targets held back: the source ran ahead of what the follower can do
    last_send: float | None = None

    def summary(self) -> dict[str, float]:
        iv = np.array(self.intervals_s) * 1e3
        rtt = np.array(self.rtts_s) * 1e3
        out: dict[str, float] = {"sent": self.sent, "refused": self.refused, "timeouts": self.timeouts,
                                 "stalls": self.stalls, "late": self.late, "reach_limited": self.reach_limited}
        if len(iv):
            out |= {"interval_median_ms": float(np.median(iv)), "interval_p99_ms": float(np.percentile(iv, 99)),
                    "interval_max_ms": float(iv.max()), "rate_hz": float(1e3 / np.mean(iv))}
        if len(rtt):
            out |= {"rtt_median_ms": float(np.median(rtt)), "rtt_p99_ms": float(np.percentile(rtt, 99))}
        return out


class TeleopSession:
    def __init__(self, cell: CellConfig, driver: str | None, source: TargetSource, *,
                 ctx: zmq.Context | None = None, say: Callable[[str], None] = print, arm: bool = False,
                 client: str = "teleop", rate_hz: float | None = None, acquire_wait_s: float = 0.0,
                 base: BaseSource | None = None):
        self.cell = cell
        self.drv = cell.driver(driver)
        self.emb = cell.embodiment(self.drv)
        self.source = source
        # A mobile base's entries are velocities: never the arm source's (a jog or a leader has no
        # base), only the base source's command, and zero (at rest) without one or while engaging.
        slices = self.emb.group_slices()
        self.base_dofs = np.array([i for g in self.emb.groups if g.mode == "base_velocity"
                                   for i in range(slices[g.name].start, slices[g.name].stop)], dtype=np.intp)
        if base is not None and self.base_dofs.size != 3:
            raise TeleopError(f"driver {self.drv.name} has no mobile base of three velocities (vx, vy, wz) to drive")
        self.base = base
        self.say = say
        self.client = client
        self.allow_arm = arm or moves_no_hardware(cell)
        self.rate_hz = float(rate_hz or follow_rate_hz(self.emb.control_rate_hz))
        self._period_ns = int(1e9 / self.rate_hz)
        self._offset_ns = 0  # driver monotonic clock minus ours
        self._tau: int | None = None  # driver time of the last target sent
        self.acquire_wait_s = acquire_wait_s
        self._own_ctx = ctx is None
        self.ctx = ctx if ctx is not None else zmq.Context()
        self.cmd = CommandClient(self.ctx, self.drv.cmd, cell.curve, default_timeout_s=1.0)
        self._cmd_lock = threading.Lock()
        self.feed = StateFeed(self.ctx, self.drv.state, cell.curve)
        self.bounds = Bounds(self.emb.lower + self.emb.position_margin, self.emb.upper - self.emb.position_margin,
                             self.emb.max_velocity, self.emb.joint_names, self.emb.max_engage_distance)
        self.stats = LoopStats()
        self.lease: str | None = None
        self._ttl_s = self.drv.lease_ttl_s
        self._status = "idle"
        self._status_lock = threading.Lock()
        self._following = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._silence_s = max(SILENCE_TICKS * self.emb.state_decimation / self.emb.control_rate_hz, MIN_SILENCE_S)
        self._closed = False
        # Blend-in: the leader moves on while the operator confirms, so following starts by
        # closing that gap at move_to's speed (a fraction of the limits), then tracks it exactly.
        self._blend_velocity = self.emb.move_to_velocity_fraction * self.emb.max_velocity
        self._blend_acceleration = self.emb.move_to_velocity_fraction * self.emb.max_acceleration
        self._blend_v = np.zeros(self.emb.dof)
        self._prev_source: np.ndarray | None = None
        self._blending = False
        self._sent: np.ndarray | None = None
        self._last_source: np.ndarray | None = None

    # ------------------------------------------------------------------ public

    @property
    def status(self) -> str:
        with self._status_lock:
            return self._status

    @property
    def following(self) -> bool:
        return self._following.is_set()

    def engage(self, confirm: Callable[[str], bool]) -> None:
        """Take the arm and start following the source, or raise TeleopError saying why not."""
        if self._closed:
            raise TeleopError("this teleop session is closed")
        self._following.clear()  # re-engaging: hold while we move
        self._set_status("engaging")
        self._handshake()
        self.source.bind(self.feed, self.bounds)
        state = self._first_state()
        if (state.get("device") or {}).get("leader_follows_in_hardware"):
            self._watch_only()
            return
        self._take_lease()
        self._arm_if_needed(state)
        target = self._at_rest(self._source_pose(wait_s=1.0))
        self._ramp_to(target, f"moving to the {self.source.name}'s pose")
        question = (f"{self.drv.name}: the follower is at the {self.source.name}'s pose. "
                    "Start following? [y/N] ")
        self._set_status("holding: waiting for the operator's confirmation")
        if not confirm(question):
            self._set_status("holding: not confirmed (engage again to follow)")
            self.say(f"teleop {self.drv.name}: not confirmed; the follower holds")
            return
        msg, _ = self.feed.latest()
        self._sent = np.asarray(msg["commanded"], dtype=np.float64) if msg else None
        self._sync_clock()
        self._tau = None
        self._last_source = None
        self._blending = True
        self._blend_v = np.zeros(self.emb.dof)
        self._prev_source = None
        self.stats.last_send = None
        self._following.set()
        self._set_status("following")
        self.say(f"teleop {self.drv.name}: following the {self.source.name} at {self.rate_hz:g} Hz")

    def hold(self, why: str = "operator") -> None:
        """Stop following; the follower holds where it was sent last; the lease is kept."""
        self._to_hold(why)

    def release(self) -> None:
        """Stop following and release the lease (the driver decelerates to a hold); re-engage later."""
        self._following.clear()
        self._stop_keeper()
        if self.lease is not None:
            try:
                self._request("release", lease=self.lease)
            except (TimeoutError, RemoteError) as exc:  # it lapses after lease_ttl_s anyway
                self.say(f"teleop {self.drv.name}: release not confirmed ({exc}); the lease lapses by itself")
            self.lease = None
        if not self.status.startswith(("holding", "watching")):
            self._set_status("released")

    def close(self) -> None:
        """Stop following and release the lease; never disarms (a raised arm must not fall)."""
        if self._closed:
            return
        self.release()
        self._closed = True
        self._set_status("closed")
        self.source.close()
        if self.base is not None:
            self.base.close()
        self.feed.close()
        self.cmd.close()
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    def __enter__(self) -> "TeleopSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ engaging

    def _request(self, kind: str, timeout_s: float = 1.0, **fields: Any) -> dict[str, Any]:
        # One connection for lease, heartbeats and commands (the lease is bound to it); ZeroMQ
        # sockets are not thread-safe, so the keeper thread and engage take turns.
        if not self._cmd_lock.acquire(timeout=timeout_s + 1.0):
            raise TimeoutError(f"{kind}: the driver connection stayed busy")
        try:
            return self.cmd.request(kind, timeout_s=timeout_s, **fields)
        finally:
            self._cmd_lock.release()

    def _handshake(self) -> None:
        try:
            reply = self._request("hello", timeout_s=2.0, version=PROTOCOL_VERSION, role="teleop")
        except TimeoutError:
            raise TeleopError(f"driver {self.drv.name} does not answer on {self.drv.cmd}: is it running "
                              f"(`armada driver CELL --name {self.drv.name}`)?") from None
        except RemoteError as exc:
            raise TeleopError(f"driver {self.drv.name} refused the handshake: {exc}") from None
        desc = reply.get("description") or {}
        if int(desc.get("action_dim", self.emb.dof)) != self.emb.dof:
            raise TeleopError(f"driver {self.drv.name} has {desc.get('action_dim')} joints, the cell's embodiment "
                              f"{self.emb.dof}: wrong cell file?")

    def _first_state(self) -> dict[str, Any]:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            msg, age = self.feed.latest()
            if msg is not None and age < self._silence_s:
                return msg
            time.sleep(0.01)
        raise TeleopError(f"no state from driver {self.drv.name} on {self.drv.state} within 2 s")

    def _watch_only(self) -> None:
        self._set_status("watching: the follower obeys its leader in hardware (teleop sends nothing)")
        self.say(f"teleop {self.drv.name}: this follower follows its leader arm in hardware (Cobot Magic masters): "
                 "watching only, no lease taken, no targets sent")

    def _take_lease(self) -> None:
        if self.lease is not None:
            return
        deadline = time.monotonic() + self.acquire_wait_s
        while True:
            try:
                reply = self._request("acquire", client=self.client)
                break
            except RemoteError as exc:
                if exc.code != "lease_held" or time.monotonic() >= deadline:
                    raise TeleopError(f"cannot take driver {self.drv.name}'s control lease: {exc.reason}") from None
            except TimeoutError as exc:
                raise TeleopError(f"driver {self.drv.name}: {exc}") from None
            time.sleep(0.05)
        self.lease = reply["lease"]
        self._ttl_s = float(reply.get("ttl_s", self._ttl_s))
        self._start_keeper()

    def _arm_if_needed(self, state: dict[str, Any]) -> None:
        mode = self._leased("ping")["mode"]
        if mode in ("armed", "running"):
            return
        if mode != "idle":
            reason = (self.feed.latest()[0] or state).get("reason", "")
            raise TeleopError(f"driver {self.drv.name} is {mode}" + (f" ({reason})" if reason else "")
                              + ": `armada status` says more; reset it first")
        if not self.allow_arm:
            raise TeleopError(f"driver {self.drv.name} is disarmed and this cell moves real hardware: run teleop "
                              "with --arm to let it arm the driver (or arm it yourself first)")
        self._leased("arm")
        self.say(f"teleop {self.drv.name}: armed the driver")

    def _leased(self, kind: str, timeout_s: float = 1.0, **fields: Any) -> dict[str, Any]:
        try:
            if kind in ("ping", "hello", "stats"):
                return self._request(kind, timeout_s=timeout_s, **fields)
            return self._request(kind, timeout_s=timeout_s, lease=self.lease, **fields)
        except (TimeoutError, RemoteError) as exc:
            raise TeleopError(f"driver {self.drv.name}: {exc}") from None

    def _source_pose(self, wait_s: float) -> np.ndarray:
        deadline = time.monotonic() + wait_s
        while True:
            pose = self.source.pose()
            if pose is not None:
                return pose
            if time.monotonic() > deadline:
                raise TeleopError(f"no target from the {self.source.name}: {self.source.reason}")
            time.sleep(0.02)

    def _ramp_to(self, target: np.ndarray, what: str) -> None:
        """A ramped move_to (the driver's trajectory, within its velocity and acceleration
        fractions), then wait until the follower is measured there."""
        msg, _ = self.feed.latest()
        start = np.asarray(msg["commanded"] if msg else target, dtype=np.float64)
        gap = np.abs(target - start)
        j = int(np.argmax(gap))
        inside = np.clip(target, self.bounds.lower, self.bounds.upper)
        if not np.allclose(inside, target):
            k = int(np.argmax(np.abs(inside - target)))
            raise TeleopError(f"the {self.source.name}'s pose is outside the follower's range at joint "
                              f"{self.bounds.joint_names[k]} ({target[k]:.3f} not in [{self.bounds.lower[k]:.3f}, "
                              f"{self.bounds.upper[k]:.3f}]): move it inside first")
        if gap[j] < 1e-6:  # already there (a jog source starts at the measured pose): nothing to ramp
            self._wait_arrival(target, ARRIVE_SLACK_S)
            return
        duration = float(self._leased("move_to", timeout_s=3.0, target=target).get("duration_s", 0.0))
        self.say(f"teleop {self.drv.name}: {what}: {gap[j]:.3f} at joint {self.bounds.joint_names[j]}, "
                 f"ramped over {duration:.1f} s")
        self._wait_arrival(target, duration + ARRIVE_SLACK_S)

    def _sync_clock(self, samples: int = 5) -> None:
        """The driver's clock offset from the ping with the shortest round trip (targets carry
        driver times)."""
        best = None
        for _ in range(samples):
            sent = time.monotonic_ns()
            driver_ns = int(self._leased("ping")["mono_ns"])
            received = time.monotonic_ns()
            if best is None or received - sent < best:
                best, self._offset_ns = received - sent, driver_ns - (sent + received) // 2

    def _wait_arrival(self, target: np.ndarray, timeout_s: float) -> None:
        tol = np.minimum(ARRIVE_TOLERANCE, ARRIVE_RANGE_FRACTION * (self.emb.upper - self.emb.lower))
        # State published before now (still queued on a loaded host) says nothing about the move.
        since_ns = int(self._leased("ping")["mono_ns"])
        deadline = time.monotonic() + timeout_s
        err = np.full(len(target), np.inf)
        while time.monotonic() < deadline:
            if self.lease is None:
                raise TeleopError(f"driver {self.drv.name}: the lease was lost during the move ({self.status}); "
                                  "the follower holds where it stopped")
            msg = self.feed.wait_next(0.2)
            if msg is None or msg["mono_ns"] < since_ns:
                continue
            if msg["mode"] not in ("armed", "running"):
                raise TeleopError(f"driver {self.drv.name} went {msg['mode']} during the move"
                                  + (f": {msg['reason']}" if msg.get("reason") else ""))
            err = np.abs(np.asarray(msg["measured"]) - target)
            if msg["mode"] == "armed" and np.all(err <= tol):
                return
        j = int(np.argmax(err - tol))
        raise TeleopError(f"the follower did not reach the {self.source.name}'s pose within {timeout_s:.1f} s "
                          f"(joint {self.bounds.joint_names[j]} is {err[j]:.3f} away, tolerance {tol[j]:.3f})")

    # ------------------------------------------------------------------ the keeper thread

    def _start_keeper(self) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, daemon=True, name=f"teleop-{self.drv.name}")
        self._keeper.start()

    def _stop_keeper(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=2.0)
            self._keeper = None

    def _keep(self) -> None:
        """Follow (a target every period) or hold (heartbeats only) until stopped or the lease is lost."""
        period = 1.0 / self.rate_hz
        beat = min(self._ttl_s / 5.0, 0.05)  # as often as the inference process beats (heartbeat_s)
        last_beat = 0.0
        next_tick = time.monotonic()
        timeouts = 0
        while not self._stop.is_set() and self.lease is not None:
            now = time.monotonic()
            if self._following.is_set():
                timeouts = self._follow_tick(timeouts)
                next_tick += period
                if next_tick < now - period:
                    next_tick = now  # fell behind (a stall): no burst of catch-up targets
                self._stop.wait(max(0.0, next_tick - time.monotonic()))
                continue
            next_tick = now
            if now - last_beat >= beat:
                last_beat = now
                try:
                    self._request("heartbeat", timeout_s=max(beat, 0.1), lease=self.lease)
                except RemoteError as exc:
                    self.lease = None
                    self._set_status(f"holding: lease lost ({exc.reason})", speak=True)
                except TimeoutError:
                    pass  # the lease lapses if the driver stays silent; the driver then holds by itself
            self._stop.wait(min(0.01, period))

    def _follow_tick(self, timeouts: int) -> int:
        msg, age = self.feed.latest()
        if msg is None or age > self._silence_s:
            self._to_hold(f"leader lost (no state from driver {self.drv.name} for {age * 1e3:.0f} ms)")
            return 0
        if msg["mode"] not in ("armed", "running"):
            self._to_hold(f"driver {self.drv.name} is {msg['mode']}" + (f": {msg['reason']}" if msg.get("reason") else ""))
            return 0
        target = self.source.pose()
        if target is None:
            self._to_hold(f"{self.source.name} lost ({self.source.reason})")
            return 0
        target = self._at_rest(target)
        sent = time.monotonic()
        stalled = self.stats.last_send is not None and sent - self.stats.last_send > STALL_PERIODS / self.rate_hz
        if stalled:
            self._last_source = None  # not one period: the source may well have moved that far
        jump = self._source_jump(target)
        if jump:
            self._to_hold(jump)
            return 0
        if stalled:
            # This process stalled (a loaded host): the follower settled on the last target while the
            # source moved on. Blend in again from where the follower is commanded, rather than
            # sending a target that jumped (the driver would refuse it: TOO_FAR).
            self.stats.stalls += 1
            self._blending, self._prev_source = True, None
            self._sent = np.asarray(msg["commanded"], dtype=np.float64)
            self._blend_v = np.asarray(msg["velocity"], dtype=np.float64)
        target = self._with_base(self._keep_within_reach(self._blend(target), msg))
        # On a steady grid, LEAD_PERIODS ahead; restarted after a stall or a drift of a period.
        due = time.monotonic_ns() + self._offset_ns + LEAD_PERIODS * self._period_ns
        tau = due if self._tau is None or stalled else self._tau + self._period_ns
        if abs(tau - due) > self._period_ns:
            tau = due
        try:
            self._request("trajectory", timeout_s=SERVO_TIMEOUT_S, lease=self.lease, t0_ns=tau,
                          dt=self._period_ns * 1e-9, points=target[None, :], merge="replace", final=True)
            self._tau = tau
        except TimeoutError:
            self.stats.timeouts += 1
            if timeouts + 1 >= MAX_SERVO_TIMEOUTS:
                self._to_hold(f"driver {self.drv.name} does not answer (no reply to {MAX_SERVO_TIMEOUTS} targets)")
                return 0
            return timeouts + 1
        except RemoteError as exc:
            if exc.code == "late" and timeouts + 1 < MAX_SERVO_TIMEOUTS:
                # Reached the driver after its time (a loaded host): skipped; the grid starts again.
                self.stats.late += 1
                self._tau = None
                return timeouts + 1
            self.stats.refused += 1
            if exc.code == "too_far":
                self._to_hold(f"the {self.source.name} jumped beyond the driver's engage distance ({exc.reason}); "
                              "engage again (a ramped move)")
            elif exc.code == "no_lease":
                self.lease = None
                self._to_hold(f"lease lost ({exc.reason})")
            else:
                self._to_hold(f"target refused: {exc.code}: {exc.reason}")
            return 0
        done = time.monotonic()
        self._sent = target
        if self.stats.last_send is not None:
            self.stats.intervals_s.append(sent - self.stats.last_send)
        self.stats.last_send = sent
        self.stats.rtts_s.append(done - sent)
        self.stats.sent += 1
        return 0

    def _blend(self, target: np.ndarray) -> np.ndarray:
        """While blending in, approach the source along a velocity- and acceleration-limited path
        (move_to's fractions of the limits), so the driver's filter never lags and overshoots."""
        if not self._blending or self._sent is None:
            return target
        dt = 1.0 / self.rate_hz
        gap = target - self._sent
        if np.all(np.abs(gap) <= self._blend_velocity * dt):
            self._blending = False  # caught up: track the source exactly from now on
            if self.stats.stalls == 0:
                self.say(f"teleop {self.drv.name}: caught up with the {self.source.name}, tracking it")
            return target
        # Per joint: the source's own velocity plus closing the gap along a braking curve, within
        # the blend's velocity limit (so a source moving slower than that is caught up with).
        v_source = np.zeros_like(gap) if self._prev_source is None else (target - self._prev_source) / dt
        self._prev_source = target.copy()
        # Closing speed on a braking curve at half the acceleration (as the driver's filter closes a
        # lag): the other half is the margin that lets the speed follow the curve down in whole
        # periods while the source itself slows, so a joint arrives at the source's own speed.
        a, dv = self._blend_acceleration, self._blend_acceleration * dt
        closing = -dv / 2 + np.sqrt((dv / 2) ** 2 + a * np.abs(gap))
        desired = np.clip(v_source + np.sign(gap) * closing, -self._blend_velocity, self._blend_velocity)
        self._blend_v = np.clip(desired, self._blend_v - dv, self._blend_v + dv)
        step = self._blend_v * dt
        return np.where(np.abs(step) >= np.abs(gap), target, self._sent + step)

    def _at_rest(self, pose: np.ndarray) -> np.ndarray:
        """The pose with the base's velocities at zero (a copy when there is a base)."""
        if not self.base_dofs.size:
            return pose
        pose = np.array(pose, dtype=np.float64)
        pose[self.base_dofs] = 0.0
        return pose

    def _with_base(self, target: np.ndarray) -> np.ndarray:
        """The base's entries from the base source, after the arms' blend and reach limits (those
        bound positions; the driver's filter bounds the base's acceleration and jerk)."""
        if self.base is None or not self.base_dofs.size:
            return target
        velocity = np.asarray(self.base.velocity(), dtype=np.float64)
        if velocity.shape != (3,) or not np.all(np.isfinite(velocity)):
            velocity = np.zeros(3)  # a broken base source: the base stops, the arms go on
        target = target.copy()
        target[self.base_dofs] = velocity
        return target

    def _source_jump(self, pose: np.ndarray) -> str | None:
        """A source that moved further than max_engage_distance in one period did not move: its
        reading broke (a glitch, an encoder wrap, another arm plugged in). Hold, do not follow it."""
        last, self._last_source = self._last_source, pose.copy()
        if last is None:
            return None
        step = np.abs(pose - last)
        j = int(np.argmax(step))
        if step[j] <= self.bounds.max_engage_distance:
            return None
        return (f"the {self.source.name} jumped {step[j]:.3f} at joint {self.bounds.joint_names[j]} in one period "
                f"(more than the engage distance, {self.bounds.max_engage_distance:g}): a broken reading? "
                "engage again (a ramped move)")

    def _keep_within_reach(self, target: np.ndarray, msg: dict[str, Any]) -> np.ndarray:
        """A source moving faster than the follower's limits runs ahead of it: send at most half the
        engage distance ahead of the commanded pose (the follower catches up at its own limits)
        instead of a target the driver would refuse (TOO_FAR)."""
        commanded = np.asarray(msg["commanded"], dtype=np.float64)
        reach = REACH_FRACTION * self.bounds.max_engage_distance
        clipped = np.clip(target, commanded - reach, commanded + reach)
        if not np.array_equal(clipped, target):
            self.stats.reach_limited += 1
        return clipped

    def _to_hold(self, why: str) -> None:
        was_following = self._following.is_set()
        self._following.clear()
        self.stats.last_send = None
        self._set_status(f"holding: {why}", speak=was_following or why == "operator")

    def _set_status(self, status: str, speak: bool = False) -> None:
        with self._status_lock:
            self._status = status
        if speak:
            self.say(f"teleop {self.drv.name}: {status}")
