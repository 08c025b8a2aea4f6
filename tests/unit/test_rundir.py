"""The run dir is private (ours, 0700, no symlinks) or refused; one instance per lock; nothing followed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armada.runtime import rundir
from armada.runtime.rundir import (InstanceLock, RunDirError, default_run_dir, open_log, prepare_run_dir, remove_ipc_sockets,
                            resolve_run_dir)

OTHER_UID = 65534  # nobody


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_run_dir_without_xdg_is_a_per_user_folder_under_tmp(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_run_dir("scripted") == Path(f"/tmp/armada-{os.geteuid()}/scripted")


def test_default_run_dir_uses_xdg_only_when_it_is_ours(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_run_dir("c") == tmp_path / f"armada-{os.geteuid()}" / "c"
    # sudo -E keeps the invoking user's XDG_RUNTIME_DIR: someone else's folder is not used
    theirs = Path("/")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs))
    assert default_run_dir("c") == Path(f"/tmp/armada-{os.geteuid()}/c")


def test_a_cell_name_that_would_escape_the_base_is_refused():
    with pytest.raises(RunDirError, match="--run-dir"):
        default_run_dir("../etc")


def test_created_private_whatever_the_umask(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    old = os.umask(0)
    try:
        assert prepare_run_dir(target) == target
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert _mode(folder) == 0o700, folder
        assert os.lstat(folder).st_uid == os.geteuid()


def test_an_existing_private_folder_is_used_as_it_is(tmp_path):
    target = tmp_path / "run"
    target.mkdir(mode=0o700)
    (target / "keep").write_text("x")
    assert prepare_run_dir(target) == target
    assert (target / "keep").read_text() == "x"


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o707, 0o777])
def test_a_folder_open_to_others_is_refused_naming_path_owner_and_mode(tmp_path, mode):
    target = tmp_path / "run"
    target.mkdir()
    os.chmod(target, mode)
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(target)
    text = str(err.value)
    assert str(target) in text and f"{mode:04o}" in text and f"uid {os.geteuid()}" in text
    assert "--run-dir" in text  # what to do
    assert _mode(target) == mode  # nothing chmod-ed silently


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    target = tmp_path / "run"
    target.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(target, OTHER_UID, OTHER_UID)
    else:  # cannot give a folder away: be another user instead
        me = os.geteuid()
        monkeypatch.setattr(rundir.os, "geteuid", lambda: me + 1)
    with pytest.raises(RunDirError, match="owned by uid"):
        prepare_run_dir(target)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a folder owned by another user")
def test_a_tmp_base_planted_by_another_user_is_refused(tmp_path, monkeypatch):
    # The attack of the issue: another user creates /tmp/armada-UID first and listens in it.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    base = tmp_path / f"armada-{os.geteuid()}"
    base.mkdir()
    os.chmod(base, 0o777)
    os.chown(base, OTHER_UID, OTHER_UID)
    with pytest.raises(RunDirError, match=str(base)):
        resolve_run_dir(None, "scripted")
    assert not (base / "scripted").exists()


def test_a_private_base_of_ours_opened_to_others_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    base = tmp_path / f"armada-{os.geteuid()}"
    base.mkdir()
    os.chmod(base, 0o755)
    with pytest.raises(RunDirError, match="group or other"):
        resolve_run_dir(None, "scripted")
    os.chmod(base, 0o700)
    assert resolve_run_dir(None, "scripted") == base / "scripted"


def test_a_symlinked_run_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(real)
    with pytest.raises(RunDirError, match="symlink"):
        prepare_run_dir(link)


def test_a_folder_writable_by_others_above_the_run_dir_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone could rename our folder away and put theirs
    with pytest.raises(RunDirError, match=str(shared)):
        prepare_run_dir(shared / "run")
    assert not (shared / "run").exists()
    os.chmod(shared, 0o1777)  # like /tmp: others cannot replace our entries
    assert prepare_run_dir(shared / "run") == shared / "run"


def test_logs_never_follow_a_planted_symlink(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    victim = tmp_path / "root-only"
    victim.write_text("secret\n")
    (run / "arm.log").symlink_to(victim)
    with pytest.raises(RunDirError, match="symlink"):
        open_log(run / "arm.log")
    assert victim.read_text() == "secret\n"
    with open_log(run / "front.log") as log:
        log.write(b"hello\n")
    assert _mode(run / "front.log") == 0o600


def test_a_second_instance_is_refused_naming_the_pid_holding_the_lock(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    first = InstanceLock(run, "driver-arm")
    with pytest.raises(RunDirError) as err:
        InstanceLock(run, "driver-arm")
    assert f"pid {os.getpid()}" in str(err.value) and "driver-arm" in str(err.value)
    other = InstanceLock(run, "driver-left")  # another role is another lock
    first.release()
    other.release()
    assert not list(run.iterdir())  # released locks leave no files
    InstanceLock(run, "driver-arm").release()


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    code = ("import sys, time; from armada.runtime.rundir import InstanceLock; "
            f"lock = InstanceLock({str(run)!r}, 'run'); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            InstanceLock(run, "run")
        os.kill(holder.pid, signal.SIGKILL)  # a crash: no release, the file stays
        holder.wait(5)
        assert (run / "run.lock").exists()
        t = time.monotonic()
        lock = InstanceLock(run, "run")  # but nobody holds it: taken at once
        assert time.monotonic() - t < 1.0
        assert (run / "run.lock").read_text().strip() == str(os.getpid())
        lock.release()
    finally:
        holder.kill()
        holder.wait(5)


@pytest.mark.parametrize("label", ["../x", "a/b", "", ".." + "x" * 80])
def test_lock_labels_cannot_climb_out_of_the_run_dir(tmp_path, label):
    with pytest.raises(RunDirError):
        InstanceLock(tmp_path, label)


def test_remove_ipc_sockets_removes_only_sockets_in_the_run_dir(tmp_path):
    import socket

    run = prepare_run_dir(tmp_path / "run")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(run / "arm-cmd"))
    sock.close()
    (run / "arm.estop").write_text("{}")  # not a socket: stays
    elsewhere = tmp_path / "other-sock"
    s2 = socket.socket(socket.AF_UNIX)
    s2.bind(str(elsewhere))
    s2.close()
    remove_ipc_sockets([f"ipc://{run}/arm-cmd", f"ipc://{run}/arm.estop", f"ipc://{elsewhere}", "ipc://@abstract",
                        "tcp://127.0.0.1:5555"], run)
    assert not (run / "arm-cmd").exists()
    assert (run / "arm.estop").exists() and elsewhere.exists()


def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    victim = tmp_path / "root-only"
    victim.write_text("secret\n")
    (run / "driver-arm.lock").symlink_to(victim)
    with pytest.raises(RunDirError, match="symlink"):
        InstanceLock(run, "driver-arm")
    assert victim.read_text() == "secret\n"


def test_a_symlinked_logs_folder_is_refused_by_the_supervisor(tmp_path):
    from armada.runtime.config import SCRIPTED_CELL
    from armada.runtime.supervisor import CellProcesses

    run = prepare_run_dir(tmp_path / "run")
    elsewhere = prepare_run_dir(tmp_path / "elsewhere")
    (run / "logs").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="symlink"):
        CellProcesses(SCRIPTED_CELL, run)
    assert not (run / "run.lock").exists()  # refused before it started or kept anything
