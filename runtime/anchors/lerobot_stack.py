"""The LeRobot stack of `armada bench anchors`: LeRobot's own asynchronous inference.

Client: lerobot's ``RobotClient`` (its control loop and action-receiving thread, its action queue,
its defaults: ``chunk_size_threshold`` 0.5 and the ``weighted_average`` merge of overlapping
steps) over armada's mock arm as a LeRobot robot (``lerobot_arm.py``).

Server: lerobot's ``PolicyServer`` on gRPC, with one method replaced: ``SendPolicyInstructions``
builds the scripted policy instead of loading a pretrained checkpoint; observations still go
through its queue, its similarity filter, ``raw_observation_to_observation`` (image to tensor and
resize to the policy's image size, which is the camera's: no shrink) and its action timing. Its
``inference_latency`` pad is 0, so the scripted policy's compute time is the only latency.

LeRobot's protocol pickles observations and actions (``pickle.loads`` of what arrives on an
insecure gRPC channel): here the server listens only on a unix socket in the bench's private run
dir (mode 0700), so no other local user can reach it, as they could a 127.0.0.1 port; never expose it.

    python -m armada.runtime.anchors.lerobot_stack server|client --cell ... --port ...
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from typing import Any

from armada.runtime.anchors.common import (CHUNK_SIZE, RunSpec, action_space, announce_window, client_result,
                                           lerobot_socket, observation, scripted_policy, spec_args, spec_of,
                                           write_result)

log = logging.getLogger("armada.anchors.lerobot")


# --------------------------------------------------------------------------- server


def serve(args: argparse.Namespace) -> int:
    import grpc
    import torch
    import zmq
    from lerobot.async_inference.configs import PolicyServerConfig
    from lerobot.async_inference.policy_server import PolicyServer
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.transport import services_pb2, services_pb2_grpc  # type: ignore

    from armada.runtime.config import load_cell
    from armada.runtime.inference.link import DriverLink

    spec: RunSpec = spec_of(args)
    cell = load_cell(args.cell, args.run_dir)
    ctx = zmq.Context()
    link = DriverLink(ctx, cell.drivers[0], cell.curve)
    space = action_space(link.handshake()["description"])  # hello only: no lease
    link.close()
    ctx.destroy(linger=0)
    image_features = {f"observation.images.{c.name}": PolicyFeature(FeatureType.VISUAL, (3, c.height, c.width))
                      for c in cell.cameras}

    class ScriptedForLerobot:
        """The scripted policy behind LeRobot's policy interface (``predict_action_chunk``)."""

        def __init__(self) -> None:
            self.policy = scripted_policy(spec)
            self.policy.reset(space)
            self.config = type("Config", (), {"image_features": image_features})()
            self.obs_mono_ns = 0

        def predict_action_chunk(self, batch: dict[str, Any]) -> "torch.Tensor":
            state = batch["observation.state"][0].numpy().astype("float64")
            chunk = self.policy.infer(observation(state, self.obs_mono_ns))
            return torch.from_numpy(chunk.actions).unsqueeze(0)

    class BenchPolicyServer(PolicyServer):
        def SendPolicyInstructions(self, request, context):  # noqa: N802 (gRPC's name)
            import pickle  # nosec: LeRobot's own protocol, loopback only (see the module docstring)

            specs = pickle.loads(request.data)  # nosec
            self.device, self.policy_type = "cpu", specs.policy_type
            self.lerobot_features = specs.lerobot_features
            self.actions_per_chunk = specs.actions_per_chunk
            self.policy = ScriptedForLerobot()
            self.preprocessor = lambda obs: obs
            self.postprocessor = lambda action: action
            return services_pb2.Empty()

        def _predict_action_chunk(self, observation_t):
            # The scripted policy is a function of the observation's time: its wall-clock stamp
            # (LeRobot's) to our monotonic clock, same host.
            age_ns = time.time_ns() - int(observation_t.get_timestamp() * 1e9)
            self.policy.obs_mono_ns = time.monotonic_ns() - age_ns
            return super()._predict_action_chunk(observation_t)

    config = PolicyServerConfig(host="127.0.0.1", port=args.port, fps=int(round(spec.rate_hz)), inference_latency=0.0)
    policy_server = BenchPolicyServer(config)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    services_pb2_grpc.add_AsyncInferenceServicer_to_server(policy_server, server)
    lerobot_socket(args.run_dir).unlink(missing_ok=True)  # a stale file of an earlier run would refuse the bind
    server.add_insecure_port(f"unix:{lerobot_socket(args.run_dir)}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(f"lerobot policy server on {lerobot_socket(args.run_dir)}", flush=True)
    stop.wait()
    policy_server.stop()
    server.stop(grace=1.0).wait(2.0)
    return 0


# --------------------------------------------------------------------------- client


def run_client(args: argparse.Namespace) -> int:
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient

    from armada.runtime.anchors.config_lerobot_arm import _config_class

    spec: RunSpec = spec_of(args)
    latencies: list[float] = []
    window: dict[str, float] = {"start": float("inf")}

    class TimedClient(RobotClient):
        def _aggregate_action_queues(self, incoming_actions, aggregate_fn=None):
            # The chunk is in the client's hands: its first action carries the observation's stamp.
            if incoming_actions and time.monotonic() >= window["start"]:
                latencies.append(time.time() - incoming_actions[0].get_timestamp())
            return super()._aggregate_action_queues(incoming_actions, aggregate_fn)

    robot = _config_class()(cell=str(args.cell), run_dir=str(args.run_dir), calibration_dir=args.run_dir / "calib")
    config = RobotClientConfig(policy_type="act", pretrained_name_or_path="armada/scripted", robot=robot,
                               actions_per_chunk=CHUNK_SIZE, server_address=f"unix:{lerobot_socket(args.run_dir)}",
                               fps=int(round(spec.rate_hz)), task="bench")
    client = TimedClient(config)  # connects the robot: lease taken, arm armed
    arm = client.robot.arm
    try:
        if not client.start():
            raise RuntimeError(f"the LeRobot policy server at {lerobot_socket(args.run_dir)} did not answer")
        window["start"] = time.monotonic() + args.warmup
        end = window["start"] + spec.seconds
        announce_window(args.out, window["start"], end)
        receiver = threading.Thread(target=client.receive_actions, daemon=True)
        receiver.start()
        threading.Timer(end - time.monotonic(), client.shutdown_event.set).start()
        client.control_loop(task="bench")
        result = client_result(arm, spec, window["start"], end, latencies,
                               dump=args.out.with_suffix(".npz") if args.out else None)
        if args.out is not None:
            write_result(args.out, result)  # before stop: gRPC may abort the process on its way out
    finally:
        client.stop()  # disconnects the robot: lease released
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m armada.runtime.anchors.lerobot_stack")
    parser.add_argument("role", choices=["server", "client"])
    spec_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return serve(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
