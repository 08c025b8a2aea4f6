"""Devices are plugins: the registry, the config validation through it, and what the CLI takes from it."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import yaml

from armada.calibration.joint_kinds import JOINT_CALIBRATIONS
from armada.calibration.results import CalibrationRecord, Residual, write_result
from armada.drivers.core.registry import BACKENDS, ENTRY_POINT_GROUP, BackendPlugin, BuildContext, PluginRegistry, \
    RegistryError, get
from armada.drivers.mock.arm import MockArm
from armada.drivers.piper.calibration import PiperZero, piper_zero_values
from armada.runtime.config import ConfigError, StrictModel, load_cell
from armada.drivers.core.registry import moves_no_hardware
from armada.runtime.cli import build_parser

INSTALLED = {"mock", "ur3", "piper", "cobot_magic", "aloha", "arx_lift2"}
VENDOR_MODULES = ("piper_sdk", "rtde_control", "rtde_receive", "can", "dynamixel_sdk", "scservo_sdk", "lerobot",
                  "torch", "pyrealsense2", "cv2", "mujoco")


class ArmUnderTestConfig(StrictModel):
    kind: Literal["test_arm"] = "test_arm"
    needs_dof: int = 7


def _check(cfg: ArmUnderTestConfig, emb) -> None:
    if emb.dof != cfg.needs_dof:
        raise ValueError(f"test arm needs {cfg.needs_dof} dofs, embodiment {emb.name} has {emb.dof}")


BUILT: list[BuildContext] = []


def _build(ctx: BuildContext) -> MockArm:
    BUILT.append(ctx)
    return MockArm(ctx.embodiment.home)


TEST_PLUGIN = BackendPlugin(kind="test_arm", config_model=ArmUnderTestConfig, build=_build, moves_hardware=True,
                            check_embodiment=_check, fake=lambda argv: 7 if argv == ["--ok"] else 1,
                            bench=lambda seconds: {"seconds": seconds})


def _cell(tmp_path: Path, backend: dict | None, **driver) -> Path:
    drv = {"name": "arm", "embodiment": "mock_arm", "state": "ipc://{run_dir}/s", "cmd": "ipc://{run_dir}/c",
           **driver}
    if backend is not None:
        drv["backend"] = backend
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "drivers": [drv],
                                    "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev"}}))
    return path


def _error(path: Path, run_dir: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_cell(path, run_dir)
    return info.value


# --------------------------------------------------------------------------- the registry


def test_the_installed_backends_are_registered_through_entry_points():
    assert INSTALLED <= set(BACKENDS.kinds())
    assert BACKENDS.broken() == {}
    for kind in INSTALLED:
        assert get(kind).kind == kind
    assert get("mock").moves_hardware is False
    assert get("mujoco").moves_hardware is False  # a simulator: `armada run` may arm it alone
    assert all(get(k).moves_hardware for k in INSTALLED - {"mock"})
    assert get("piper").joint_calibration_kind == "piper_zero"
    assert {"so101", "aloha_gripper", "piper_zero"} <= set(JOINT_CALIBRATIONS.kinds())


def test_an_unknown_kind_lists_the_known_ones():
    with pytest.raises(RegistryError) as info:
        get("no_such_robot")
    message = str(info.value)
    assert "'no_such_robot'" in message
    for kind in INSTALLED:
        assert kind in message


def _eps(*pairs: tuple[str, str]) -> list[EntryPoint]:
    return [EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in pairs]


def test_a_plugin_that_fails_to_import_is_named_with_its_error_and_the_others_still_load():
    reg = PluginRegistry(ENTRY_POINT_GROUP, BackendPlugin, "backend kind",
                         entry_points=lambda: _eps(("mock", "armada.drivers.mock.plugin:PLUGIN"),
                                                   ("broken", "no_such_package.plugin:PLUGIN"),
                                                   ("notaplugin", "armada.drivers.mock.plugin:build"),
                                                   ("misnamed", "armada.drivers.ur3.plugin:PLUGIN")))
    assert reg.kinds() == ["mock"]
    broken = reg.broken()
    assert set(broken) == {"broken", "notaplugin", "misnamed"}
    assert "no_such_package.plugin:PLUGIN" in broken["broken"] and "ModuleNotFoundError" in broken["broken"]
    assert "not a BackendPlugin" in broken["notaplugin"]
    assert "'ur3'" in broken["misnamed"]
    with pytest.raises(RegistryError, match=r"'broken' is registered but its plugin does not load: .*no_such_package"):
        reg.get("broken")
    with pytest.raises(RegistryError, match=r"unknown backend kind 'other'; known: mock \(failed to load: broken"):
        reg.get("other")
    assert reg.get("mock").kind == "mock"


def test_a_kind_registered_twice_is_refused_not_guessed():
    reg = PluginRegistry(ENTRY_POINT_GROUP, BackendPlugin, "backend kind",
                         entry_points=lambda: _eps(("mock", "armada.drivers.mock.plugin:PLUGIN"),
                                                   ("mock", "armada.drivers.mock.plugin:PLUGIN"),
                                                   ("mock", "armada.drivers.mock.plugin:PLUGIN"),
                                                   ("ur3", "armada.drivers.ur3.plugin:PLUGIN")))
    assert reg.kinds() == ["ur3"]
    with pytest.raises(RegistryError, match="registered twice"):
        reg.get("mock")


def test_extra_plugins_live_only_inside_their_with_block():
    assert "test_arm" not in BACKENDS.kinds()
    with BACKENDS.extra(TEST_PLUGIN):
        assert get("test_arm") is TEST_PLUGIN
        assert INSTALLED <= set(BACKENDS.kinds())
    assert "test_arm" not in BACKENDS.kinds()
    with pytest.raises(TypeError):
        with BACKENDS.extra("not a plugin"):  # type: ignore[arg-type]
            pass
    with pytest.raises(RuntimeError):
        with BACKENDS.extra(TEST_PLUGIN):
            raise RuntimeError("the block failed")
    assert "test_arm" not in BACKENDS.kinds()


def test_loading_every_plugin_imports_no_vendor_sdk():
    code = ("import sys, json\n"
            "from armada.drivers.core.registry import BACKENDS\n"
            "from armada.calibration.joint_kinds import JOINT_CALIBRATIONS\n"
            "assert BACKENDS.all() and JOINT_CALIBRATIONS.all(), 'no plugins'\n"
            "assert not BACKENDS.broken() and not JOINT_CALIBRATIONS.broken(), (BACKENDS.broken(), "
            "JOINT_CALIBRATIONS.broken())\n"
            "from armada.runtime.cli import build_parser\n"
            "build_parser()\n"  # what every `armada driver` process does first
            f"print(json.dumps([m for m in {VENDOR_MODULES!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# --------------------------------------------------------------------------- cells through the registry


def test_a_driver_without_backend_is_an_error_not_a_mock_arm(tmp_path, short_tmp):
    err = _error(_cell(tmp_path, None), short_tmp)
    assert err.key == "drivers.0.backend" and "missing" in err.reason
    assert "mock" in err.reason and "piper" in err.reason  # the known kinds


def test_an_unknown_backend_kind_lists_the_known_ones(tmp_path, short_tmp):
    err = _error(_cell(tmp_path, {"kind": "roomba"}), short_tmp)
    assert err.key == "drivers.0.backend.kind"
    assert "'roomba'" in err.reason and "ur3" in err.reason and "cobot_magic" in err.reason


@pytest.mark.parametrize("backend, key, reason", [
    ({"kind": "piper"}, "drivers.0.backend.can", "Field required"),
    ({"kind": "piper", "can": "can0", "speed_pct": 0}, "drivers.0.backend.speed_pct", "greater than or equal to 1"),
    ({"kind": "mock", "wheels": 4}, "drivers.0.backend.wheels", "Extra inputs are not permitted"),
    ({"can": "can0"}, "drivers.0.backend.kind", "missing"),
    ("piper", "drivers.0.backend", "must be a mapping"),
])
def test_backend_errors_name_file_key_and_reason(tmp_path, short_tmp, backend, key, reason):
    path = _cell(tmp_path, backend)
    err = _error(path, short_tmp)
    assert (err.file, err.key) == (str(path), key)
    assert reason in err.reason


def test_the_plugin_checks_the_embodiment_when_the_cell_loads(tmp_path, short_tmp):
    # mock_arm has 7 dofs: a UR3 (6) fails at load, naming the driver; a PiPer (7) loads.
    err = _error(_cell(tmp_path, {"kind": "ur3", "host": "10.0.0.2"}), short_tmp)
    assert err.key == "drivers.0.backend" and "'arm'" in err.reason and "6 dofs" in err.reason
    cell = load_cell(_cell(tmp_path, {"kind": "piper", "can": "can0"}), short_tmp)
    assert type(cell.drivers[0].backend).__name__ == "PiperBackendConfig"
    err = _error(_cell(tmp_path, {"kind": "piper", "can": "239.1.2.3", "bustype": "virtual"}), short_tmp)
    assert "virtual" in err.reason and "udp_multicast" in err.reason


def test_a_backend_takes_only_its_own_joint_calibration_kind(tmp_path, short_tmp):
    zero = PiperZero([f"joint_{i + 1}" for i in range(6)], np.zeros(6), 0.0)
    write_result(tmp_path / "zero.yaml", CalibrationRecord("joint_calibration", "test", {"hold_spread": Residual(
        0.0, "rad", 0.01)}, piper_zero_values(zero), {"samples": 10}))
    (tmp_path / "motors.json").write_text(json.dumps(
        {"gripper": {"id": 6, "drive_mode": 0, "homing_offset": 0, "range_min": 100, "range_max": 3000}}))
    piper = {"kind": "piper", "can": "can0"}
    assert load_cell(_cell(tmp_path, piper, joint_calibration="zero.yaml"), short_tmp).path == tmp_path / "cell.yaml"
    err = _error(_cell(tmp_path, piper, joint_calibration="motors.json"), short_tmp)
    assert err.key == "drivers.0.joint_calibration" and "piper_zero" in err.reason
    # A backend that applies none checks only that the file loads.
    load_cell(_cell(tmp_path, {"kind": "mock"}, joint_calibration="motors.json"), short_tmp)


def test_a_registered_test_plugin_validates_builds_and_decides_arming(tmp_path, short_tmp):
    from armada.drivers.core.process import make_backend
    from armada.runtime.config import driver_embodiment

    with BACKENDS.extra(TEST_PLUGIN):
        err = _error(_cell(tmp_path, {"kind": "test_arm", "needs_dof": 6}), short_tmp)
        assert "test arm needs 6 dofs" in err.reason
        cell = load_cell(_cell(tmp_path, {"kind": "test_arm"}), short_tmp)
        assert cell.folder == tmp_path
        drv = cell.drivers[0]
        backend = make_backend(drv, driver_embodiment(cell.path, drv), cell.folder)
        assert isinstance(backend, MockArm) and BUILT[-1].cell_dir == tmp_path
        assert not moves_no_hardware(cell)
        args = build_parser().parse_args(["fake", "test_arm", "--ok"])
        from armada.runtime.cli import run_fake

        assert run_fake(args.device, args.args) == 7
        assert build_parser().parse_args(["bench", "test_arm"]).what == "test_arm"
    assert moves_no_hardware(load_cell(_cell(tmp_path, {"kind": "mock"}), short_tmp))


def test_cli_choices_come_from_the_registry(capsys):
    parser = build_parser()
    for spine in ("loop", "rtt", "state", "frames", "all", "model", "cameras", "estop", "ur3", "piper"):
        assert parser.parse_args(["bench", spine]).what == spine
    assert parser.parse_args(["fake", "ur3", "--help"]).device == "ur3"
    with pytest.raises(SystemExit):
        parser.parse_args(["fake", "mock"])  # no fake: nothing to talk to
    assert "invalid choice" in capsys.readouterr().err
    for command in ("so101", "aloha-gripper", "piper-zero"):
        with pytest.raises(SystemExit):
            parser.parse_args(["calibrate", "joints", command, "--help"])
        assert "--out" in capsys.readouterr().out


# --------------------------------------------------------------------------- cameras and policies

from armada.drivers.cameras.registry import CAMERAS, CameraPlugin  # noqa: E402
from armada.drivers.cameras.source import Captured  # noqa: E402
from armada.runtime.config import CameraBaseConfig  # noqa: E402
from armada.runtime.inference.registry import POLICIES, PolicyPlugin  # noqa: E402


def _plain_cell(tmp_path: Path, **extra) -> Path:
    path = tmp_path / "cell.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "drivers": [{"name": "arm", "embodiment": "mock_arm", "backend": {"kind": "mock"},
                                  "state": "ipc://{run_dir}/s", "cmd": "ipc://{run_dir}/c"}],
        "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev"}, **extra}))
    return path


def test_the_installed_cameras_and_policies_are_registered_through_entry_points():
    assert {"synthetic", "realsense", "opencv", "mujoco"} <= set(CAMERAS.kinds()) and CAMERAS.broken() == {}
    assert {"scripted", "mergevla", "sim_expert"} <= set(POLICIES.kinds()) and POLICIES.broken() == {}
    assert POLICIES.get("mergevla").needs_model and not POLICIES.get("scripted").needs_model


def test_validating_cells_imports_no_camera_or_model_stack():
    code = ("import sys, json\n"
            "from armada.runtime.config import load_cell\n"
            "load_cell('configs/cells/cameras_fake.yaml', '/tmp')\n"
            "load_cell(None, '/tmp')\n"  # the default cell: the merged VLA over synthetic cameras
            f"print(json.dumps([m for m in {VENDOR_MODULES!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("extra, key, words", [
    ({"cameras": [{"name": "c", "frames": "ipc://{run_dir}/f", "kind": "webcam"}]}, "cameras.0.kind",
     "unknown camera kind 'webcam'; known: mujoco, opencv, realsense, synthetic"),
    ({"cameras": [{"name": "c", "frames": "ipc://{run_dir}/f", "kind": "realsense", "serial": [1]}]},
     "cameras.0.serial", "valid string"),
    ({"inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev", "policy": {"kind": "gpt"}}},
     "inference.policy.kind", "unknown policy kind 'gpt'; known: mergevla, remote, scripted, sim_expert"),
    ({"inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev", "policy": {"amplitude": 1}}},
     "inference.policy.kind", "missing: one of ['mergevla', 'remote', 'scripted', 'sim_expert']"),
    ({"inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev", "policy": "scripted"}},
     "inference.policy", "must be a mapping with a kind"),
    ({"inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev",
                    "policy": {"kind": "mergevla", "bundle": "b", "tiny_tasks": 0}}},
     "inference.policy.tiny_tasks", "greater than or equal to 1"),
])
def test_camera_and_policy_errors_name_the_key_and_list_the_known_kinds(tmp_path, short_tmp, extra, key, words):
    err = _error(_plain_cell(tmp_path, **extra), short_tmp)
    assert err.key == key and words in err.reason, err


def test_a_camera_without_kind_is_synthetic_and_no_policy_is_scripted(tmp_path, short_tmp):
    from pydantic import TypeAdapter

    from armada.drivers.cameras.plugins import SyntheticCameraConfig
    from armada.runtime.config import CameraConfig
    from armada.runtime.inference.policy import ScriptedPolicy, ScriptedPolicyConfig
    from armada.runtime.inference.process import make_policy

    cell = load_cell(_plain_cell(tmp_path, cameras=[{"name": "c", "frames": "ipc://{run_dir}/f"}]), short_tmp)
    assert type(cell.cameras[0]) is SyntheticCameraConfig and cell.cameras[0].kind == "synthetic"
    assert type(cell.inference.policy) is ScriptedPolicyConfig
    assert isinstance(make_policy(cell), ScriptedPolicy)
    # Built in code, the same rule: no kind is synthetic; a model of the wrong kind is refused.
    built = TypeAdapter(CameraConfig).validate_python({"name": "c", "frames": "ipc:///tmp/f"})
    assert type(built) is SyntheticCameraConfig
    with pytest.raises(ValueError, match="unknown camera kind 'webcam'"):
        TypeAdapter(CameraConfig).validate_python({"name": "c", "frames": "ipc:///tmp/f", "kind": "webcam"})


class GreyCameraConfig(CameraBaseConfig):
    kind: Literal["grey"] = "grey"
    level: int = 128


class GreySource:
    """A test camera: flat grey frames, counting what the camera process asked of it."""

    def __init__(self, cfg: GreyCameraConfig, folder: Path | None):
        self.cfg, self.folder, self.reads, self.closed = cfg, folder, 0, False

    def open(self) -> dict:
        return {"grey": self.cfg.level}

    def read(self, timeout_s: float) -> Captured:
        self.reads += 1
        rgb = np.full((self.cfg.height, self.cfg.width, 3), self.cfg.level, np.uint8)
        return Captured(rgb=rgb, capture_ns=1_000_000 * self.reads, clock="test")

    def close(self) -> None:
        self.closed = True


OPENED: list[GreySource] = []


def _grey(cfg: GreyCameraConfig, folder: Path | None) -> GreySource:
    OPENED.append(GreySource(cfg, folder))
    return OPENED[-1]


def test_an_extra_camera_plugin_is_validated_and_run_by_a_cell_in_process(tmp_path, short_tmp):
    from armada.drivers.cameras.process import CameraProcess

    grey = CameraPlugin(kind="grey", config_model=GreyCameraConfig, build=_grey)
    cam = {"name": "g", "frames": "ipc://{run_dir}/g", "kind": "grey", "width": 8, "height": 4}
    with CAMERAS.extra(grey):
        err = _error(_plain_cell(tmp_path, cameras=[cam | {"level": "dark"}]), short_tmp)
        assert err.key == "cameras.0.level", err
        cell = load_cell(_plain_cell(tmp_path, cameras=[cam | {"level": 7}]), short_tmp)
        cfg = cell.camera("g")
        assert type(cfg) is GreyCameraConfig and cfg.level == 7
        process = CameraProcess(cfg, base_dir=cell.folder)
        process.run(max_frames=3)
    source = OPENED[-1]
    assert process.source is source and source.folder == tmp_path
    assert (process.frames_sent, source.reads, source.closed) == (3, 3, True)
    assert "grey" not in CAMERAS.kinds()
    err = _error(_plain_cell(tmp_path, cameras=[cam]), short_tmp)  # gone with the block
    assert err.key == "cameras.0.kind" and "unknown camera kind 'grey'" in err.reason


class FixedPolicyConfig(StrictModel):
    kind: Literal["fixed"] = "fixed"
    note: str


def test_an_extra_policy_plugin_is_validated_and_built_from_the_cell(tmp_path, short_tmp):
    from armada.runtime.inference.policy import ScriptedPolicy
    from armada.runtime.inference.process import deadlines, make_policy

    built: list = []

    def build(cell):
        built.append(cell)
        return ScriptedPolicy(0.1, 1.0, cell.inference.chunking.size, cell.inference.chunking.dt)

    fixed = PolicyPlugin(kind="fixed", config_model=FixedPolicyConfig, build=build, needs_model=True)
    inference = {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/ev", "policy": {"kind": "fixed"}}
    with POLICIES.extra(fixed):
        err = _error(_plain_cell(tmp_path, inference=inference), short_tmp)
        assert err.key == "inference.policy.note" and "required" in err.reason.lower(), err
        inference["policy"]["note"] = "hello"
        cell = load_cell(_plain_cell(tmp_path, inference=inference), short_tmp)
        assert isinstance(make_policy(cell), ScriptedPolicy) and built == [cell]
        assert deadlines(cell).first_policy_s >= 60.0  # needs_model: the first call may load weights
    assert "fixed" not in POLICIES.kinds()
