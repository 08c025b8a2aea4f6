"""A TCP proxy that delays, stalls and cuts a link: the network between two hosts, for tests and
`armada bench remote` on one machine (no root needed, unlike `tc netem`).

- ``delay_s``: every byte is delivered this long after it arrived (one way; a round trip pays it twice);
- ``stall(seconds)``: nothing moves for a while, then everything queued goes at once; this is what
  loss looks like above TCP (the retransmit), so it stands for loss;
- ``cut()``: a pulled cable: connections stay open but nothing gets through and nothing is refused
  (no RST, so neither side learns of it but by silence), until ``restore()``, when what was held
  arrives, as TCP's retransmits would deliver it.

Each direction holds at most ``_MAX_QUEUED`` bytes; past that it stops reading, so TCP's own flow
control pushes back on the sender, as a slow link does.

Threads, one per direction per connection; every blocking call has a timeout so ``close()`` ends them.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
import time
from dataclasses import dataclass, field

_POLL_S = 0.002  # a send to a full peer waits this long before the pump looks again
_IDLE_S = 0.05  # the longest a pump sleeps (how soon it sees close())
_CHUNK = 256 * 1024
# About a socket buffer: a real link holds little in flight, and a deep queue here would feed a
# subscriber that stopped reading seconds of old messages once it reads again.
_MAX_QUEUED = 256 * 1024


@dataclass
class LinkStats:
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    connections: int = 0


@dataclass
class DelayProxy:
    listen_host: str
    target: tuple[str, int]
    delay_s: float = 0.0
    listen_port: int = 0  # 0: any free port (see .port)
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        if not 0.0 <= self.delay_s <= 10.0:
            raise ValueError(f"delay_s {self.delay_s} outside 0-10 s")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stalled_until = 0.0
        self._cut = False
        self._server = socket.create_server((self.listen_host, self.listen_port))
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._start(self._accept_loop)

    @property
    def address(self) -> str:
        return f"tcp://{self.listen_host}:{self.port}"

    def stall(self, seconds: float) -> None:
        with self._lock:
            self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)

    def cut(self) -> None:
        with self._lock:
            self._cut = True

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=1.0)
        for s in self._socks + [self._server]:
            s.close()

    def __enter__(self) -> "DelayProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _start(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=1.0)
            except OSError:
                client.close()  # nothing listens behind us: refuse, as the real host would
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(_POLL_S)
            self._socks += [client, upstream]
            self.stats.connections += 1
            self._start(self._pump, client, upstream, True)
            self._start(self._pump, upstream, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued = [0]
        while not self._stop.is_set():
            # Sleep until data arrives or the queue's head is due (not a fixed poll: six pumps
            # polling every few ms would load a small host more than the link they stand for).
            wait = _IDLE_S
            if queue:
                wait = max(0.0, min(wait, queue[0][0] - time.monotonic()))
                with self._lock:
                    held = self._cut or time.monotonic() < self._stalled_until
                if held:
                    wait = _POLL_S * 5
            watch = [src] if queued[0] < _MAX_QUEUED else []
            try:
                readable = select.select(watch, [], [], wait)[0] if watch else time.sleep(wait)
                if readable:
                    data = src.recv(_CHUNK)
                    if not data:
                        break  # peer closed: pass the close on once the queue is out
                    queue.append((time.monotonic() + self.delay_s, data))
                    queued[0] += len(data)
            except socket.timeout:
                pass
            except (OSError, ValueError):  # ValueError: select on a closed socket at shutdown
                break
            if not self._send_due(queue, dst, up, queued):
                break
        deadline = time.monotonic() + self.delay_s + 1.0
        while queue and time.monotonic() < deadline and not self._stop.is_set():
            if not self._send_due(queue, dst, up, queued):
                break
            time.sleep(_POLL_S)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _send_due(self, queue: collections.deque, dst: socket.socket, up: bool, queued: list[int]) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._stalled_until or self._cut:
                return True
        while queue and queue[0][0] <= now:
            due, data = queue[0]
            try:
                sent = dst.send(data)  # short timeout: a full peer is backpressure, not an error
            except socket.timeout:
                return True
            except OSError:
                return False
            queued[0] -= sent
            if sent < len(data):
                queue[0] = (due, data[sent:])
            else:
                queue.popleft()
            if up:
                self.stats.bytes_up += sent
            else:
                self.stats.bytes_down += sent
        return True
