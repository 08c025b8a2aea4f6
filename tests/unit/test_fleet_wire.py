"""Issue 16 without Ray: the fleet's wire format and the ``remote`` policy's deadlines and failover,
against a stand-in service (a stdlib HTTP server answering as the real one does)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from armada.runtime.fleet.plugin import RemotePolicy, RemotePolicyConfig
from armada.runtime.fleet.wire import (ChunkReply, ModelRequest, RouteReply, WireError, decode_chunk_reply,
                                       decode_request, encode_chunk_reply, encode_route_reply)
from armada.runtime.inference.observation import Observation
from armada.runtime.inference.policy import ActionSpace, PolicyError
from armada.runtime.protocol import encode

HOME = np.array([0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04])
SPACE = ActionSpace([f"j{i}" for i in range(7)], HOME - 1, HOME + 1, np.zeros(7, bool))


def _obs() -> Observation:
    frames = {c: np.full((48, 64, 3), 7, np.uint8) for c in ("front", "wrist")}
    return Observation(time.monotonic_ns(), time.time_ns(), HOME.copy(), frames)


def test_a_request_round_trips_with_raw_array_buffers():
    obs = _obs()
    raw = ModelRequest("infer", "pick cube", obs.state, obs.frames, "pick_cube", 160.0, "cell-a").encode()
    req = decode_request(raw)
    assert (req.op, req.task, req.instruction, req.client, req.deadline_ms) == ("infer", "pick_cube", "pick cube",
                                                                               "cell-a", 160.0)
    assert np.array_equal(req.state, HOME) and np.array_equal(req.frames["wrist"], obs.frames["wrist"])
    assert b"pickle" not in raw and raw.count(obs.frames["front"].tobytes()) == 2  # the pixels as they are


@pytest.mark.parametrize("change, status, words", [
    ({"v": 2}, 400, "version"),
    ({"op": "train"}, 400, "op must be"),
    ({"task": None}, 400, "routed task"),
    ({"deadline_ms": 0}, 400, "deadline_ms"),
    ({"deadline_ms": True}, 400, "deadline_ms"),
    ({"state": np.array([np.inf] * 7)}, 400, "NaN or infinity"),
    ({"state": np.zeros((7, 1))}, 400, "state must be"),
    ({"frames": {}}, 400, "frames must be"),
    ({"frames": {"front": np.zeros((4, 4, 3), np.float32)}}, 400, "uint8"),
    ({"frames": {f"c{i}": np.zeros((2, 2, 3), np.uint8) for i in range(8)} | {"c8": 1}}, 400, "frames must be"),
    ({"frames": {f"c{i}": np.zeros((2, 2, 3), np.uint8) for i in range(9)}}, 413, "arrays"),
])
def test_a_malformed_request_is_refused_naming_what_is_wrong(change, status, words):
    msg = {"v": 1, "op": "infer", "client": "c", "instruction": "x", "task": "t", "state": HOME,
           "frames": {"front": np.zeros((4, 4, 3), np.uint8)}, "deadline_ms": 100.0} | change
    with pytest.raises(WireError) as err:
        decode_request(encode(msg))
    assert err.value.status == status and words in err.value.reason, err.value.reason


def test_an_oversized_request_is_refused_before_decoding():
    with pytest.raises(WireError) as err:
        decode_request(b"\x80" + b"\x00" * (4 * 1024 * 1024 + 1))
    assert err.value.status == 413


def test_a_reply_with_the_wrong_action_size_or_non_finite_actions_is_refused():
    good = encode_chunk_reply(ChunkReply(np.zeros((8, 7)), 0.02, "t"))
    assert decode_chunk_reply(good, 7).actions.shape == (8, 7)
    with pytest.raises(WireError, match="7 action values, the cell takes 6"):
        decode_chunk_reply(good, 6)
    with pytest.raises(WireError, match="NaN"):
        decode_chunk_reply(encode_chunk_reply(ChunkReply(np.full((8, 7), np.nan), 0.02, "t")), 7)


# --------------------------------------------------------------------------- the policy against a stand-in


class StandIn:
    """Answers /route and /infer; ``script`` says what the next infer requests get: an HTTP status,
    'hang' (no answer for a second), or 'ok'."""

    def __init__(self) -> None:
        self.script: list[object] = []
        self.requests: list[ModelRequest] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = decode_request(body)
                stand_in.requests.append(req)
                what = stand_in.script.pop(0) if stand_in.script and req.op == "infer" else "ok"
                if what == "hang":
                    time.sleep(1.5)
                if isinstance(what, int):
                    self._send(what, b"replica gone\n", "text/plain")
                elif req.op == "route":
                    self._send(200, encode_route_reply(RouteReply(req.task or "pick_cube", {"pick_cube": 1.0},
                                                                  {"pick_cube": 1.0}, 1.0)))
                else:
                    actions = np.repeat(req.state[None], 8, axis=0)
                    self._send(200, encode_chunk_reply(ChunkReply(actions, 0.02, req.task, {"replica": "r1"})))

            def _send(self, status: int, body: bytes, kind: str = "application/msgpack") -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (a timeout): nobody is listening

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in():
    s = StandIn()
    yield s
    s.close()


def _policy(url: str, timeout_s: float = 0.2, failover_s: float = 1.0) -> RemotePolicy:
    policy = RemotePolicy(url, timeout_s, 5.0, failover_s, client="test")
    policy.reset(SPACE)
    return policy


def test_route_then_infer_carry_the_routed_task_and_the_chunk_deadline(stand_in):
    policy = _policy(stand_in.url, timeout_s=0.16)
    assert policy.route(_obs(), "pick cube").task == "pick_cube"
    chunk = policy.infer(_obs())
    assert chunk.actions.shape == (8, 7) and chunk.dt == 0.02
    assert stand_in.requests[-1].task == "pick_cube" and stand_in.requests[-1].deadline_ms == pytest.approx(160.0)
    assert policy.episode_notes()["failures"] == 0 and policy.episode_notes()["replicas"] == ["r1"]


def test_a_dead_replica_or_a_timeout_is_retried_and_the_notes_say_so(stand_in):
    policy = _policy(stand_in.url, timeout_s=0.6, failover_s=5.0)  # generous: the stand-in on a loaded machine
    policy.route(_obs(), "auto", "pick_cube")
    stand_in.script = [500, "hang", 503]
    started = time.monotonic()
    assert policy.infer(_obs()).actions.shape == (8, 7)
    notes = policy.episode_notes()
    assert notes["failures"] >= 3 and notes["failovers"] == 1, notes  # more only if a good answer came late
    # held_s is rounded to the millisecond: it may read up to 0.5 ms above the true time held.
    assert 0.6 <= notes["held_s"] <= time.monotonic() - started + 0.0005 and not stand_in.script


def test_a_slow_service_is_not_flooded_each_timeout_doubles_the_next_wait(stand_in):
    policy = _policy(stand_in.url, timeout_s=0.2, failover_s=5.0)
    policy.route(_obs(), "auto", "pick_cube")
    stand_in.script = ["hang", "hang"]  # each held for 1.5 s: past the 0.2 s and 0.4 s attempts
    sent = len(stand_in.requests)
    policy.infer(_obs())
    assert len(stand_in.requests) - sent == 3  # not one every 50 ms
    # Each attempt tells the service its own deadline (it drops a request that waited past it).
    assert [r.deadline_ms for r in stand_in.requests[sent:]] == pytest.approx([200.0, 400.0, 800.0])
    notes = policy.episode_notes()
    assert notes["failures"] == 2 and notes["held_s"] >= 0.2 + 0.05 + 0.4 + 0.1, notes


@pytest.mark.parametrize("down", ["503", "refused"])
def test_a_service_that_stays_down_fails_the_call_after_failover_s_naming_it(stand_in, down):
    policy = _policy(stand_in.url, failover_s=0.5)
    policy.route(_obs(), "auto")
    if down == "503":
        stand_in.script = [503] * 1000
    else:  # nothing listens there any more
        policy._close()
        policy.port = _closed_port()
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"did not answer infer within 0\.5 s .*the arm held"):
        policy.infer(_obs())
    assert time.monotonic() - started < 0.5 + 0.2 + 1.0  # the window, one short attempt, slack for a loaded box


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_4xx_is_not_retried_it_is_a_bad_request(stand_in):
    policy = _policy(stand_in.url)
    policy.route(_obs(), "auto")
    stand_in.script = [422]
    with pytest.raises(PolicyError, match="refused infer: HTTP 422: replica gone"):
        policy.infer(_obs())
    assert policy.episode_notes()["failures"] == 0


def test_the_config_wants_an_http_url():
    assert RemotePolicyConfig(url="http://127.0.0.1:8000/").url == "http://127.0.0.1:8000"
    assert RemotePolicyConfig(url="https://gpu:8443").url == "https://gpu:8443"
    with pytest.raises(ValueError, match="http://host:port"):
        RemotePolicyConfig(url="ftp://gpu")


@pytest.mark.parametrize("url", ["http://gpu:8000", "http://10.0.0.3:8000", "http://[fe80::1]:8000"])
def test_plain_http_to_another_host_is_refused_unless_the_cell_says_the_network_is_trusted(url):
    # Chunks are arm commands: anyone on the network could send them over plain HTTP.
    with pytest.raises(ValueError, match="plain HTTP to another host"):
        RemotePolicyConfig(url=url)
    assert RemotePolicyConfig(url=url, plain_http_off_host=True).url == url
    for local in ("http://localhost:8000", "http://127.0.0.5:8000", "http://[::1]:8000"):
        assert RemotePolicyConfig(url=local).url == local


def test_the_cell_side_never_imports_ray_or_torch():
    code = ("import sys, armada.runtime.fleet.plugin, armada.runtime.fleet.wire; "
            "print(','.join(m for m in ('ray', 'torch', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
