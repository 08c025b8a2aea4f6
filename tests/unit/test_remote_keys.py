"""`armada keys` and the per-host key choice (runtime/remote/keys.py, hostkeys.py)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zmq

from armada.runtime.config import CurveConfig
from armada.runtime.remote.hostkeys import HostKeysError, apply_host_keys, host_curve
from armada.runtime.remote.keys import make_keys, parse_hosts
from armada.runtime.transport import CommandClient, CommandServer, start_authenticator


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_one_key_pair_per_host_private_and_allow_lists(tmp_path):
    dirs = make_keys(tmp_path / "k", parse_hosts("robot,gpu"))
    assert set(dirs) == {"robot", "gpu"}
    assert _mode(tmp_path / "k") == 0o700
    for host, d in dirs.items():
        assert _mode(d) == 0o700 and _mode(d / "allowed") == 0o700
        assert _mode(d / f"{host}.key_secret") == 0o600
        assert sorted(p.name for p in (d / "allowed").iterdir()) == ["gpu.key", "robot.key"]
        assert not any("secret" in p.name for p in (d / "allowed").iterdir())
        assert not any("secret" in p.name for p in (d / "servers").iterdir())
        other = {"robot": "gpu", "gpu": "robot"}[host]
        assert not (d / f"{other}.key_secret").exists()  # a host's folder holds only its own secret
        assert (d / "servers" / f"{other}.key").read_bytes() == (dirs[other] / f"{other}.key").read_bytes()
    pub_r = zmq.auth.load_certificate(str(dirs["robot"] / "robot.key"))[0]
    pub_g = zmq.auth.load_certificate(str(dirs["gpu"] / "gpu.key"))[0]
    assert pub_r != pub_g
    assert not (tmp_path / "k" / ".public").exists()


def test_refuses_to_overwrite_existing_keys(tmp_path):
    make_keys(tmp_path, parse_hosts("robot,gpu"))
    before = (tmp_path / "robot" / "robot.key_secret").read_bytes()
    with pytest.raises(FileExistsError, match="robot"):
        make_keys(tmp_path, parse_hosts("robot,other"))
    assert (tmp_path / "robot" / "robot.key_secret").read_bytes() == before
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("text, match", [("", "no host"), ("robot,robot", "twice"), ("../x", "host name"),
                                         ("a=1.2.3.4,b=1.2.3.4", "address"), ("a=", "empty")])
def test_bad_host_lists_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_hosts(text)


def test_addresses_map_each_endpoint_host_to_its_key(tmp_path):
    dirs = make_keys(tmp_path, parse_hosts("robot=127.0.0.2,gpu=127.0.0.3"))
    section = yaml.safe_load((dirs["gpu"] / "curve.yaml").read_text())
    assert section["server_keys"] == {"127.0.0.2": "servers/robot.key", "127.0.0.3": "servers/gpu.key"}
    assert section["server_public_key"] == "servers/robot.key"
    assert section["server_secret_key"] == section["client_secret_key"] == "gpu.key_secret"


def test_cli_writes_keys_and_rejects_a_bad_list(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "keys", str(tmp_path / "k"), "--hosts", "a,b"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "k" / "a" / "a.key_secret").exists() and "ARMADA_KEYS" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "armada.runtime.cli", "keys", str(tmp_path / "k2"), "--hosts", "a,a"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "twice" in bad.stderr and not (tmp_path / "k2").exists()


# ---------------------------------------------------------------- the per-host choice


def test_env_picks_this_hosts_keys_over_the_cells_section(tmp_path):
    dirs = make_keys(tmp_path, parse_hosts("robot,gpu"))
    data = {"name": "c", "curve": {"server_public_key": "/nowhere"}}
    out = apply_host_keys(data, tmp_path / "cell.yaml", {"ARMADA_KEYS": str(dirs["gpu"])})
    assert out["curve"]["server_secret_key"] == str(dirs["gpu"] / "gpu.key_secret")
    assert out["curve"]["server_public_key"] == str(dirs["gpu"] / "servers" / "robot.key")
    assert out["curve"]["authorized_clients"] == str(dirs["gpu"] / "allowed")
    assert data["curve"] == {"server_public_key": "/nowhere"}  # the input is not changed
    CurveConfig(**out["curve"])  # a valid section


def test_cell_keys_folder_relative_to_the_cell(tmp_path):
    make_keys(tmp_path / "keys", parse_hosts("robot,gpu"))
    out = apply_host_keys({"curve": {"keys": "keys/robot"}}, tmp_path / "cell.yaml", {})
    assert out["curve"]["client_secret_key"] == str(tmp_path / "keys" / "robot" / "robot.key_secret")


def test_no_choice_leaves_the_cell_alone(tmp_path):
    data = {"curve": {"server_public_key": "a", "authorized_clients": "b"}}
    assert apply_host_keys(data, tmp_path / "c.yaml", {}) is data
    assert apply_host_keys({"name": "x"}, None, {"ARMADA_KEYS": ""}) == {"name": "x"}


def test_a_folder_that_is_not_a_key_set_is_a_clear_error(tmp_path):
    with pytest.raises(HostKeysError, match="armada keys"):
        apply_host_keys({}, None, {"ARMADA_KEYS": str(tmp_path)})
    (tmp_path / "curve.yaml").write_text("[1, 2]")
    with pytest.raises(HostKeysError, match="not a curve section"):
        host_curve(tmp_path)


def _curve(folder: Path) -> CurveConfig:
    return CurveConfig(**{k: v for k, v in host_curve(folder).items() if k != "server_keys"})


def test_hosts_talk_with_their_own_keys_and_a_stranger_is_refused(tmp_path):
    dirs = make_keys(tmp_path / "cell", parse_hosts("robot,gpu"))
    stranger = make_keys(tmp_path / "other", parse_hosts("gpu"))["gpu"]  # same name, another key
    ctx = zmq.Context()
    robot = _curve(dirs["robot"])
    auth = start_authenticator(ctx, robot)
    server = CommandServer(ctx, "tcp://127.0.0.1:0", robot)
    endpoint = server.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        gpu_curve = _curve(dirs["gpu"])
        assert gpu_curve.server_public_key == dirs["gpu"] / "servers" / "robot.key"
        good = CommandClient(ctx, endpoint, gpu_curve, default_timeout_s=2.0)
        bad = CommandClient(ctx, endpoint, _curve_with_server(stranger, dirs["robot"] / "robot.key"),
                            default_timeout_s=0.5)
        import threading

        def serve():
            for _ in range(20):
                if server.poll(0.1):
                    raw = server.recv_raw()
                    if raw is not None:
                        server.reply_ok(server.parse(raw))
        t = threading.Thread(target=serve)
        t.start()
        assert isinstance(good.request("hello", role="t"), dict)
        with pytest.raises(TimeoutError):
            bad.request("hello", role="t")
        t.join()
        good.close()
        bad.close()
    finally:
        server.close()
        auth.stop()
        ctx.destroy(linger=0)


def _curve_with_server(folder: Path, server_key: Path) -> CurveConfig:
    c = _curve(folder)
    return c.model_copy(update={"server_public_key": server_key})


# ---------------------------------------------------------------- the shipped split cell


def test_the_shipped_split_cell_loads_with_each_hosts_keys(tmp_path, monkeypatch):
    from armada.runtime.config import CONFIG_DIR, load_cell

    dirs = make_keys(tmp_path, parse_hosts("robot=10.0.0.2,gpu=10.0.0.3"))
    path = CONFIG_DIR / "cells" / "remote_scripted.yaml"
    for host, other in (("robot", "gpu"), ("gpu", "robot")):
        monkeypatch.setenv("ARMADA_KEYS", str(dirs[host]))
        curve = load_cell(path, tmp_path / "run").curve
        assert curve.server_secret_key == dirs[host] / f"{host}.key_secret"
        assert curve.server_keys == {"10.0.0.2": dirs[host] / "servers" / "robot.key",
                                     "10.0.0.3": dirs[host] / "servers" / "gpu.key"}


def test_the_split_cell_without_keys_is_a_clear_config_error(monkeypatch):
    from armada.runtime.config import CONFIG_DIR, load_cell
    from armada.runtime.errors import ConfigError

    if Path("/etc/armada/keys/curve.yaml").exists():
        pytest.skip("this machine has a key set in /etc/armada/keys")
    monkeypatch.delenv("ARMADA_KEYS", raising=False)
    with pytest.raises(ConfigError, match="curve.*armada keys"):
        load_cell(CONFIG_DIR / "cells" / "remote_scripted.yaml", "/tmp/x")
