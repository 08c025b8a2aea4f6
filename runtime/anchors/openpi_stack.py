"""The openpi stack of `armada bench anchors`: openpi's own client against a server in its style.

Client: the real ``openpi-client`` package, run the way openpi's examples run it: a ``Runtime``
loop at ``max_hz`` over an ``Environment`` (here: armada's mock arm and cameras, one servo target
per step) and a ``PolicyAgent`` over an ``ActionChunkBroker`` over a ``WebsocketClientPolicy``.
The broker is synchronous: when its chunk is used up, the next ``infer`` blocks the loop.

Server: ours, written from openpi's protocol (websocket, binary msgpack frames with numpy arrays
as raw buffers, a metadata frame on connect, the action chunk under ``actions`` with the server's
timing beside it, an error as a text frame). Arrays are decoded only as plain numeric dtypes:
nothing is unpickled.

    python -m armada.runtime.anchors.openpi_stack server|client --cell ... --port ...
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from typing import Any

import msgpack
import numpy as np

from armada.runtime.anchors.common import (CHUNK_SIZE, Arm, RunSpec, action_space, announce_window, client_result,
                                           observation, scripted_policy, spec_args, spec_of, write_result)

log = logging.getLogger("armada.anchors.openpi")

MAX_MESSAGE_BYTES = 16 << 20  # two 640x480 RGB frames are 1.8 MB
NUMERIC_KINDS = "biuf"  # bool, int, uint, float: never object or void arrays


# --------------------------------------------------------------------------- wire format


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"cannot send an array of dtype {obj.dtype}")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"refused an array of dtype {dtype}")
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind not in NUMERIC_KINDS:
            raise ValueError(f"refused a scalar of dtype {dtype}")
        return dtype.type(obj[b"data"])
    return obj


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_decode)


# --------------------------------------------------------------------------- server


def serve(args: argparse.Namespace) -> int:
    import zmq
    from websockets.sync.server import serve as ws_serve

    from armada.runtime.config import load_cell
    from armada.runtime.inference.link import DriverLink

    spec = spec_of(args)
    cell = load_cell(args.cell, args.run_dir)
    ctx = zmq.Context()
    link = DriverLink(ctx, cell.drivers[0], cell.curve)
    space = action_space(link.handshake()["description"])  # hello only: no lease
    link.close()
    ctx.destroy(linger=0)
    policy = scripted_policy(spec)
    metadata = {"policy": "armada scripted", "chunk_size": CHUNK_SIZE, "latency_s": spec.latency_s}

    def handle(ws: Any) -> None:
        policy.reset(space)  # a new client: a new episode
        ws.send(pack(metadata))
        while True:
            try:
                data = ws.recv()
            except Exception:  # closed by the client
                return
            try:
                t0 = time.monotonic_ns()
                obs = unpack(data)
                state = np.asarray(obs["state"], dtype=np.float64)
                chunk = policy.infer(observation(state, int(obs["t_ns"])))
                infer_ms = (time.monotonic_ns() - t0) * 1e-6
                ws.send(pack({"actions": chunk.actions, "server_timing": {"infer_ms": infer_ms}}))
            except Exception:
                ws.send(traceback.format_exc()[-2000:])  # openpi's convention: an error is a text frame
                ws.close()
                return

    with ws_serve(handle, "127.0.0.1", args.port, compression=None, max_size=MAX_MESSAGE_BYTES) as server:
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        print(f"openpi-style server on ws://127.0.0.1:{args.port}", flush=True)
        server.serve_forever()
    return 0


# --------------------------------------------------------------------------- client


def run_client(args: argparse.Namespace) -> int:
    from openpi_client import action_chunk_broker, base_policy, websocket_client_policy
    from openpi_client.runtime import environment, runtime
    from openpi_client.runtime.agents import policy_agent

    spec: RunSpec = spec_of(args)
    arm = Arm(args.cell, args.run_dir)
    latencies: list[float] = []

    class TimedPolicy(base_policy.BasePolicy):
        """Measures observation to chunk-in-hand around the websocket policy."""

        def __init__(self, inner: base_policy.BasePolicy):
            self.inner = inner

        def infer(self, obs: dict) -> dict:
            result = self.inner.infer(obs)
            if time.monotonic() >= start:
                latencies.append((time.monotonic_ns() - int(obs["t_ns"])) * 1e-9)
            return result

        def reset(self) -> None:
            self.inner.reset()

    class ArmEnvironment(environment.Environment):
        def reset(self) -> None:
            pass  # the arm stays where it is: the bench measures timing, not homing

        def is_episode_complete(self) -> bool:
            return time.monotonic() >= end

        def get_observation(self) -> dict:
            arm.poll()
            return {"state": arm.state, "t_ns": np.int64(time.monotonic_ns()), "images": dict(arm.frames)}

        def apply_action(self, action: dict) -> None:
            arm.servo(action["actions"])

    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=args.port)
    try:
        arm.connect()
        start = time.monotonic() + args.warmup
        end = start + spec.seconds
        announce_window(args.out, start, end)
        broker = action_chunk_broker.ActionChunkBroker(TimedPolicy(policy), action_horizon=CHUNK_SIZE)
        loop = runtime.Runtime(ArmEnvironment(), policy_agent.PolicyAgent(broker), [], max_hz=spec.rate_hz,
                               num_episodes=1)
        loop.run()
        result = client_result(arm, spec, start, end, latencies,
                               dump=args.out.with_suffix('.npz') if args.out else None)
    finally:
        arm.close()
    if args.out is not None:
        write_result(args.out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m armada.runtime.anchors.openpi_stack")
    parser.add_argument("role", choices=["server", "client"])
    spec_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return serve(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
