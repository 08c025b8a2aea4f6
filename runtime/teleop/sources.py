"""Where teleop's targets come from: a leader arm, or joint jogging from the keyboard or a gamepad.

Every source gives ``pose()``: the follower's next target in its action units, or None when it has
none now, with ``reason`` saying why (the leader is unplugged, no state from the driver, ...).
The session binds a source to the follower's state stream (``StateFeed``) and joint bounds before
it engages, and calls ``pose()`` once per servo tick from its following thread.

The mapping from keys and gamepad axes to joint motion, and the integration into a clamped target,
are pure (``JointJog``, ``KeyboardJog.on_key``, ``GamepadMapping.velocity``) and unit-tested with
fake event feeds; the adapters around the terminal (termios, stdlib) and the gamepad (python
``evdev``: headless, works over SSH, no X11 or SDL) only turn device events into those calls.

SpaceMouse (Cartesian) jogging is not here: it needs the embodiment's kinematics (IK in-process),
which armada does not have yet.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zmq

from armada.runtime.transport import Subscriber

# A source integrating velocities never integrates more than this at once: a stalled caller
# (a late tick, a debugger) must not turn into a jump.
MAX_INTEGRATION_DT_S = 0.1


# --------------------------------------------------------------------------- the follower's state


class StateFeed:
    """The newest state message of one driver, received in a thread of its own.

    ``latest()`` returns it with its age (seconds since it arrived here), so a reader can tell a
    silent driver (no state: old age) from a leader that merely stands still (fresh state, same pose).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, curve: Any = None):
        self._sub = Subscriber(ctx, endpoint, curve, hwm=100)
        self._lock = threading.Lock()
        self._latest: dict[str, Any] | None = None
        self._at = 0.0
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="teleop-state")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._sub.recv(0.05)
            if msg is None:
                continue
            with self._cond:
                self._latest, self._at = msg, time.monotonic()
                self._cond.notify_all()

    def latest(self) -> tuple[dict[str, Any] | None, float]:
        """(newest message or None, its age in seconds; inf when none came yet)."""
        with self._lock:
            if self._latest is None:
                return None, float("inf")
            return self._latest, time.monotonic() - self._at

    def wait_next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message to arrive (None on timeout)."""
        with self._cond:
            before = self._latest
            self._cond.wait_for(lambda: self._latest is not before, timeout=timeout_s)
            return self._latest if self._latest is not before else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._sub.close()


@dataclass(frozen=True)
class Bounds:
    """What a source needs of the follower: where a target may go, and how far it may lead."""

    lower: np.ndarray  # joint range, already narrowed by the driver's position margin
    upper: np.ndarray
    max_velocity: np.ndarray
    joint_names: list[str]
    # A target further than this from the commanded pose is refused by the driver (TOO_FAR).
    max_engage_distance: float

    @property
    def dof(self) -> int:
        return len(self.lower)


# --------------------------------------------------------------------------- the source protocol


class TargetSource(Protocol):
    name: str
    reason: str  # why pose() returned None, last time it did

    def bind(self, feed: StateFeed, bounds: Bounds) -> None:
        """Called by the session before it engages (again): start from the follower's state."""

    def pose(self) -> np.ndarray | None:
        """The next target, or None (``reason`` says why): the session then holds."""

    def close(self) -> None: ...


class BaseSource(Protocol):
    """A mobile base's velocity command (vx, vy, wz), read once per servo tick while following."""

    name: str
    reason: str

    def velocity(self) -> np.ndarray: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- leader


class LeaderSource:
    """The leader arm published by the follower's own driver (state ``device["leader"]``)."""

    name = "leader"

    def __init__(self) -> None:
        self.reason = "not bound to a driver's state yet"
        self._feed: StateFeed | None = None
        self._dof = 0

    def bind(self, feed: StateFeed, bounds: Bounds) -> None:
        self._feed, self._dof = feed, bounds.dof

    def pose(self) -> np.ndarray | None:
        if self._feed is None:
            return None
        msg, _ = self._feed.latest()
        pose, reason = leader_from_state(msg, self._dof)
        if pose is None:
            self.reason = reason
        return pose

    def follows_in_hardware(self) -> bool:
        msg = self._feed.latest()[0] if self._feed is not None else None
        return bool(msg and (msg.get("device") or {}).get("leader_follows_in_hardware"))

    def close(self) -> None:
        pass


def leader_source() -> LeaderSource:
    return LeaderSource()


def leader_from_state(msg: dict[str, Any] | None, dof: int) -> tuple[np.ndarray | None, str]:
    """The leader's pose in a state message, or None and why (interface 1 of issue 11)."""
    if msg is None:
        return None, "no state from the driver yet"
    device = msg.get("device") or {}
    if "leader" not in device:
        return None, ("the driver publishes no leader (device['leader'] missing: does its backend read a "
                      "leader arm, e.g. so101 leader_in_state: true?)")
    value = device["leader"]
    if value is None:
        return None, str(device.get("leader_error") or "the leader cannot be read (no reason given)")
    pose = np.asarray(value, dtype=np.float64)
    if pose.shape != (dof,) or not np.all(np.isfinite(pose)):
        return None, f"the leader's pose is unusable (shape {pose.shape}, expected ({dof},), finite values)"
    return pose, ""


# --------------------------------------------------------------------------- jogging (pure)


class JointJog:
    """A joint-space target moved by steps and velocities, clamped to the joint range and kept
    within ``lead`` of a reference (the follower's commanded pose) so the driver never refuses it."""

    def __init__(self, start: np.ndarray, lower: np.ndarray, upper: np.ndarray, lead: float):
        self.lower, self.upper, self.lead = np.asarray(lower, float), np.asarray(upper, float), float(lead)
        self.target = np.clip(np.asarray(start, dtype=np.float64), self.lower, self.upper)

    def step(self, joint: int, delta: float) -> None:
        self.target[joint] += delta
        self._clamp()

    def integrate(self, velocity: np.ndarray, dt: float) -> None:
        self.target += np.asarray(velocity, dtype=np.float64) * min(max(dt, 0.0), MAX_INTEGRATION_DT_S)
        self._clamp()

    def keep_near(self, reference: np.ndarray | None) -> None:
        """The follower lags a target that runs ahead faster than its limits: keep within ``lead``."""
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            self.target = np.clip(self.target, ref - self.lead, ref + self.lead)
            self._clamp()

    def _clamp(self) -> None:
        np.clip(self.target, self.lower, self.upper, out=self.target)


# Terminal key tokens: printable characters as themselves, arrows by name.
ARROWS = {"\x1b[A": "up", "\x1b[B": "down", "\x1b[C": "right", "\x1b[D": "left",
          "\x1bOA": "up", "\x1bOB": "down", "\x1bOC": "right", "\x1bOD": "left"}


def key_tokens(data: str) -> list[str]:
    """Split terminal input into keys: arrow escape sequences become 'up', 'down', 'left', 'right';
    a lone escape becomes 'esc'; other escape sequences are dropped (unknown function keys)."""
    out: list[str] = []
    i = 0
    while i < len(data):
        if data[i] == "\x1b":
            seq = data[i:i + 3]
            if seq in ARROWS:
                out.append(ARROWS[seq])
                i += 3
                continue
            if len(data) - i >= 2 and data[i + 1] in "[O":
                j = i + 2
                while j < len(data) and not data[j].isalpha() and data[j] != "~":
                    j += 1
                i = j + 1  # an unknown sequence (F-keys, Home, ...): skipped whole
                continue
            out.append("esc")
            i += 1
            continue
        out.append(data[i])
        i += 1
    return out


KEYBOARD_HELP = ("keys: 1-9 select a joint, up/down (or +/-) jog it, [ ] halve/double the step, "
                 "0 selects the last joint (gripper)")


@dataclass
class KeyboardJog:
    """Key -> joint step mapping (pure). A terminal gives key presses and autorepeat, never key
    releases, so each press moves the selected joint by one step (holding a key repeats it)."""

    dof: int
    step: float = 0.02  # rad (or the joint's units) per press
    joint: int = 0
    min_step: float = 0.001
    max_step: float = 0.2

    def on_key(self, key: str, jog: JointJog) -> str | None:
        """Apply one key; returns what it did (for the operator), or None if it is not a jog key."""
        if key.isdigit():
            j = self.dof - 1 if key == "0" else int(key) - 1
            if j >= self.dof:
                return f"no joint {key}: this arm has {self.dof}"
            self.joint = j
            return f"joint {j + 1} selected"
        if key in ("up", "+", "="):
            jog.step(self.joint, self.step)
            return f"joint {self.joint + 1} +{self.step:.3g}"
        if key in ("down", "-", "_"):
            jog.step(self.joint, -self.step)
            return f"joint {self.joint + 1} -{self.step:.3g}"
        if key == "[":
            self.step = max(self.min_step, self.step / 2)
            return f"step {self.step:.3g}"
        if key == "]":
            self.step = min(self.max_step, self.step * 2)
            return f"step {self.step:.3g}"
        return None


class KeyboardSource:
    """Joint jogging from terminal keys fed by the caller (``on_key``): the CLI reads the terminal
    (``TerminalKeys``) and passes the keys that are not its own commands here."""

    name = "keyboard"

    def __init__(self, step: float = 0.02):
        self.reason = "not bound to a driver's state yet"
        self._step = step
        self._feed: StateFeed | None = None
        self._keys: KeyboardJog | None = None
        self._jog: JointJog | None = None
        self._lock = threading.Lock()

    def bind(self, feed: StateFeed, bounds: Bounds) -> None:
        start = _measured(feed)
        with self._lock:
            self._feed = feed
            self._keys = KeyboardJog(bounds.dof, self._step)
            self._jog = None if start is None else JointJog(start, bounds.lower, bounds.upper,
                                                             0.5 * bounds.max_engage_distance)
        if start is None:
            self.reason = "no state from the driver: cannot start jogging from the arm's pose"

    def on_key(self, key: str) -> str | None:
        with self._lock:
            if self._keys is None or self._jog is None:
                return None
            return self._keys.on_key(key, self._jog)

    def pose(self) -> np.ndarray | None:
        # Every press counts: a follower still catching up is sent its target in reach-limited steps
        # by the session, and gets there. (A gamepad's velocities instead keep near the arm, below.)
        with self._lock:
            if self._jog is None or self._feed is None:
                return None
            return self._jog.target.copy()

    def close(self) -> None:
        pass


def _measured(feed: StateFeed, wait_s: float = 1.0) -> np.ndarray | None:
    deadline = time.monotonic() + wait_s
    while True:
        msg, _ = feed.latest()
        if msg is not None:
            return np.asarray(msg["measured"], dtype=np.float64)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _commanded(feed: StateFeed) -> np.ndarray | None:
    msg, _ = feed.latest()
    return None if msg is None else np.asarray(msg["commanded"], dtype=np.float64)


# --------------------------------------------------------------------------- terminal


# --------------------------------------------------------------------------- gamepad


@dataclass
class AxisBinding:
    axis: str  # evdev code name, e.g. "ABS_X"
    joint: int  # joint index within the bank (see GamepadMapping)
    sign: float = 1.0


@dataclass
class GamepadMapping:
    """Gamepad axes -> joint velocities (pure). Sticks drive four joints at a time; the shoulder
    buttons switch the bank (joints 1-4, 5-8, ...); the triggers open and close the last joint (the
    gripper). Full deflection is ``speed_fraction`` of each joint's velocity limit; a dead zone
    keeps a stick at rest from drifting the arm."""

    dof: int
    max_velocity: np.ndarray
    speed_fraction: float = 0.2
    deadzone: float = 0.12
    sticks: list[AxisBinding] = field(default_factory=lambda: [
        AxisBinding("ABS_X", 0), AxisBinding("ABS_Y", 1, -1.0), AxisBinding("ABS_RX", 2), AxisBinding("ABS_RY", 3, -1.0)])
    close_trigger: str = "ABS_Z"
    open_trigger: str = "ABS_RZ"
    bank_down: str = "BTN_TL"
    bank_up: str = "BTN_TR"
    bank: int = 0

    @property
    def gripper(self) -> int:
        return self.dof - 1

    @property
    def banks(self) -> int:
        arm = self.dof - 1  # the last joint is on the triggers
        return max(1, -(-arm // len(self.sticks)))

    def on_button(self, name: str, pressed: bool) -> str | None:
        if not pressed:
            return None
        if name == self.bank_up:
            self.bank = (self.bank + 1) % self.banks
        elif name == self.bank_down:
            self.bank = (self.bank - 1) % self.banks
        else:
            return None
        first = self.bank * len(self.sticks)
        return f"sticks drive joints {first + 1}-{min(first + len(self.sticks), self.dof - 1)}"

    def velocity(self, axes: dict[str, float]) -> np.ndarray:
        """Joint velocities from normalised axes (sticks -1..1, triggers 0..1)."""
        v = np.zeros(self.dof)
        for b in self.sticks:
            j = self.bank * len(self.sticks) + b.joint
            if j >= self.dof - 1:
                continue
            v[j] = b.sign * _dead(axes.get(b.axis, 0.0), self.deadzone)
        grip = _dead(axes.get(self.open_trigger, 0.0), self.deadzone) - _dead(axes.get(self.close_trigger, 0.0),
                                                                               self.deadzone)
        v[self.gripper] = grip
        return v * self.speed_fraction * np.asarray(self.max_velocity, dtype=np.float64)


def _dead(x: float, zone: float) -> float:
    """Dead zone, rescaled so the output still reaches 1 at full deflection."""
    x = float(np.clip(x, -1.0, 1.0))
    if abs(x) <= zone:
        return 0.0
    return float(np.sign(x) * (abs(x) - zone) / (1.0 - zone))


def normalise_axis(value: int, lo: int, hi: int, centred: bool) -> float:
    """An evdev absolute axis value -> -1..1 (sticks) or 0..1 (triggers)."""
    if hi <= lo:
        return 0.0
    unit = (value - lo) / (hi - lo)
    return float(np.clip(2 * unit - 1 if centred else unit, -1.0, 1.0))


TRIGGER_AXES = ("ABS_Z", "ABS_RZ", "ABS_GAS", "ABS_BRAKE")


class GamepadSource:
    """Joint jogging from a gamepad through python-evdev (Linux input events, /dev/input/event*):
    a reader thread keeps the axes' state; ``pose()`` integrates the mapped velocities."""

    name = "gamepad"

    def __init__(self, device: str | None = None, speed_fraction: float = 0.2, say: Any = print):
        import importlib.util

        if importlib.util.find_spec("evdev") is None:
            raise RuntimeError("gamepad jogging needs python-evdev: .venv/bin/pip install evdev-binary")
        self.reason = "not bound to a driver's state yet"
        self._path = device or find_gamepad()
        self._speed = speed_fraction
        self._say = say
        self._axes: dict[str, float] = {}
        self._lock = threading.Lock()
        self._mapping: GamepadMapping | None = None
        self._jog: JointJog | None = None
        self._feed: StateFeed | None = None
        self._last = time.monotonic()
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self, feed: StateFeed, bounds: Bounds) -> None:
        start = _measured(feed)
        with self._lock:
            self._feed = feed
            self._mapping = GamepadMapping(bounds.dof, bounds.max_velocity, self._speed)
            self._jog = None if start is None else JointJog(start, bounds.lower, bounds.upper,
                                                             0.5 * bounds.max_engage_distance)
            self._last = time.monotonic()
        if start is None:
            self.reason = "no state from the driver: cannot start jogging from the arm's pose"
        self._start_reader()

    def _start_reader(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, daemon=True, name="teleop-gamepad")
            self._thread.start()

    def _read(self) -> None:
        import evdev
        from evdev import ecodes

        try:
            dev = evdev.InputDevice(self._path)
            info = {code: absinfo for code, absinfo in dev.capabilities().get(ecodes.EV_ABS, [])}
            while not self._stop.is_set():
                ready, _, _ = select.select([dev.fd], [], [], 0.1)
                if not ready:
                    continue
                for ev in dev.read():
                    self._on_event(ev, info, ecodes)
        except OSError as exc:  # unplugged: the source says so and the session holds
            with self._lock:
                self._error = f"gamepad {self._path}: {exc.strerror or exc}"

    def _on_event(self, ev: Any, info: dict[int, Any], ecodes: Any) -> None:
        if ev.type == ecodes.EV_ABS and ev.code in info:
            name = _code_name(ecodes.ABS, ev.code)
            a = info[ev.code]
            with self._lock:
                self._axes[name] = normalise_axis(ev.value, a.min, a.max, centred=name not in TRIGGER_AXES)
        elif ev.type == ecodes.EV_KEY and self._mapping is not None:
            with self._lock:
                said = self._mapping.on_button(_code_name(ecodes.BTN, ev.code), ev.value == 1)
            if said:
                self._say(said)

    def pose(self) -> np.ndarray | None:
        with self._lock:
            if self._error is not None:
                self.reason = self._error
                return None
            if self._jog is None or self._mapping is None or self._feed is None:
                return None
            now = time.monotonic()
            self._jog.integrate(self._mapping.velocity(self._axes), now - self._last)
            self._last = now
            self._jog.keep_near(_commanded(self._feed))
            return self._jog.target.copy()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


@dataclass
class BaseMapping:
    """Gamepad axes -> a mobile base's velocity command (vx, vy, wz), pure. Left stick: forward /
    back and sideways; right stick, left / right: turning. Full deflection is ``speed_fraction``
    of each velocity bound; the dead zone keeps a stick at rest from creeping the base."""

    max_velocity: np.ndarray  # vx (m/s), vy (m/s), wz (rad/s)
    speed_fraction: float = 0.2
    deadzone: float = 0.12
    forward: AxisBinding = field(default_factory=lambda: AxisBinding("ABS_Y", 0, -1.0))  # stick up: forward
    sideways: AxisBinding = field(default_factory=lambda: AxisBinding("ABS_X", 1, -1.0))  # stick left: +y
    turn: AxisBinding = field(default_factory=lambda: AxisBinding("ABS_RX", 2, -1.0))  # stick left: turn left

    def velocity(self, axes: dict[str, float]) -> np.ndarray:
        v = np.zeros(3)
        for b in (self.forward, self.sideways, self.turn):
            v[b.joint] = b.sign * _dead(axes.get(b.axis, 0.0), self.deadzone)
        return v * self.speed_fraction * np.asarray(self.max_velocity, dtype=np.float64)


class GamepadBase(GamepadSource):
    """Drives a mobile base from a gamepad while the arms follow another source (teleop's --base).
    ``velocity()`` is the stick command; zero when the gamepad is unplugged (the base stops)."""

    name = "gamepad (base)"

    def __init__(self, max_velocity: np.ndarray, device: str | None = None, speed_fraction: float = 0.2,
                 say: Any = print):
        super().__init__(device, speed_fraction, say)
        self.base_mapping = BaseMapping(np.asarray(max_velocity, dtype=np.float64), speed_fraction)
        self.reason = ""
        self._start_reader()

    def velocity(self) -> np.ndarray:
        with self._lock:
            if self._error is not None:
                self.reason = self._error
                return np.zeros(3)
            return self.base_mapping.velocity(self._axes)


def _code_name(table: dict[int, Any], code: int) -> str:
    name = table.get(code, str(code))
    return name[0] if isinstance(name, (list, tuple)) else name  # evdev lists aliases for some codes


def find_gamepad() -> str:
    """The first input device with sticks and gamepad buttons."""
    import evdev
    from evdev import ecodes

    for path in evdev.list_devices():
        with contextlib.suppress(OSError):
            caps = evdev.InputDevice(path).capabilities()
            if ecodes.EV_ABS in caps and ecodes.BTN_GAMEPAD in caps.get(ecodes.EV_KEY, []):
                return path
    raise RuntimeError("no gamepad found in /dev/input (is it plugged in, and may this user read /dev/input/event*? "
                       "add the user to the 'input' group)")

