"""The run dir: a private folder for a cell's ipc sockets, locks, logs and e-stop latches.

Whoever can write to the run dir can bind a driver's socket paths (and swallow an e-stop) or
plant symlinks for our log files, so the folder must be ours alone: owned by the effective user,
mode 0700, not a symlink, and every folder above it unwritable by other users. Anything else is
refused with the path, its owner and mode, and what to do; nothing is chmod-ed or reused silently.

One process per role per run dir: :class:`InstanceLock` holds an flock on ``<run_dir>/<label>.lock``
for the lifetime of the process (the kernel drops it when the process dies, so a crash never
leaves a stale lock) and names the pid holding it when a second instance tries.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from pathlib import Path

# Labels become file names in the run dir: nothing that could climb out of it.
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_OPEN_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


# A supervisor puts its pid here in the environment of each process it starts (runtime.cli).
PARENT_PID_ENV = "ARMADA_PARENT_PID"


class RunDirError(RuntimeError):
    """The run dir cannot be used safely, or another instance holds its lock."""


def default_run_dir(cell_name: str) -> Path:
    """``$XDG_RUNTIME_DIR/armada-UID/CELL``, or ``/tmp/armada-UID/CELL`` without one (sudo, containers, CI).

    Short on purpose: ipc paths are limited to about 100 bytes. Nothing is created here; pass the
    result to :func:`prepare_run_dir`, which creates each missing folder private and checks the rest.
    """
    if not _SAFE_LABEL.match(cell_name):
        raise RunDirError(f"cell name {cell_name!r} cannot name a run dir folder: use letters, digits, '_', '.', '-'"
                          " or pass --run-dir")
    return Path(_runtime_base()) / f"armada-{os.geteuid()}" / cell_name


def _runtime_base() -> str:
    # sudo -E keeps the invoking user's XDG_RUNTIME_DIR: not ours, so not used.
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    try:
        if xdg and os.path.isabs(xdg) and os.stat(xdg).st_uid == os.geteuid():
            return xdg
    except OSError:
        pass
    return "/tmp"


def resolve_run_dir(run_dir: str | Path | None, cell_name: str) -> Path:
    """The run dir a command uses: ``--run-dir`` when given, else the default; created and checked."""
    if run_dir is not None:
        return prepare_run_dir(run_dir)
    path = default_run_dir(cell_name)
    prepare_run_dir(path.parent)  # the per-user base is checked private too, not just not-writable
    return prepare_run_dir(path)


def prepare_run_dir(path: str | Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700, check it is private, return it absolute."""
    path = Path(os.path.abspath(Path(path).expanduser()))  # abspath, not resolve(): symlinks are not followed
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    existing_ancestors = list(path.parents) if probe == path else [probe, *probe.parents]
    for ancestor in existing_ancestors:
        _check_ancestor(ancestor)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)  # exact mode whatever the umask allows less: checked just below
        except FileExistsError:
            pass  # created meanwhile (a sibling process): checked like any existing folder
        except OSError as exc:
            raise RunDirError(f"run dir {path}: cannot create {folder}: {exc.strerror}") from None
        _check_private(folder, path)
    _check_private(path, path)
    return path


def _check_private(folder: Path, run_dir: Path) -> None:
    try:
        st = os.lstat(folder)
    except OSError as exc:
        raise RunDirError(f"run dir {run_dir}: cannot stat {folder}: {exc.strerror}") from None
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symlink"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
    elif st.st_mode & 0o077:
        problem = "is open to group or other users"
    if problem is not None:
        raise RunDirError(
            f"run dir {run_dir}: {folder} {problem} (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)} "
            f"{st.st_mode & 0o7777:04o}); another user could bind its sockets or plant links there. "
            f"Remove it if it is yours and stale, or pass --run-dir with a folder only you can write to")


def _check_ancestor(folder: Path) -> None:
    """A folder above the run dir must not let other users replace what lies under it."""
    try:
        link = os.lstat(folder)
        st = os.stat(folder)
    except OSError as exc:
        raise RunDirError(f"cannot stat {folder}: {exc.strerror}") from None
    owners = (0, os.geteuid())
    sticky = bool(st.st_mode & stat.S_ISVTX)  # /tmp: others may write but not rename our entries
    if link.st_uid not in owners or st.st_uid not in owners or (st.st_mode & 0o022 and not sticky):
        raise RunDirError(
            f"{folder} (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}) lies above the run dir and other "
            f"users could replace what is in it; pass --run-dir with a folder under one only you (or root) can write")


def open_private_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a symlink at ``path`` (a planted link must not redirect our writes)."""
    try:
        return os.open(path, flags | _OPEN_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symlink; refusing to open it (remove it)") from None
        raise


def open_log(path: Path):
    """Append-only binary log file opened without following symlinks, private to us."""
    fd = open_private_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise RunDirError(f"log {path} is not a regular file of ours (owner uid {st.st_uid}); remove it")
    return os.fdopen(fd, "ab")


def remove_ipc_sockets(endpoints: list[str], run_dir: Path) -> None:
    """Unlink the socket files of ``ipc://`` endpoints directly in ``run_dir`` (nothing else: not a
    link, not a file, not elsewhere). Call it only while holding the lock of the process that bound them."""
    for endpoint in endpoints:
        if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
            continue
        path = Path(endpoint.removeprefix("ipc://"))
        if path.parent != Path(run_dir):
            continue
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass


def instance_label(role: str, name: str | None) -> str:
    """The lock label of one process: driver-arm, camera-front, inference, run."""
    if role == "infer":
        return "inference"
    return f"{role}-{name}" if name is not None else role


class InstanceLock:
    """An exclusive, non-blocking flock on ``<run_dir>/<label>.lock`` holding our pid.

    Hold the object for the process lifetime. ``release()`` removes the file; a process that dies
    without releasing leaves a file nobody holds, which the next instance simply takes.
    """

    def __init__(self, run_dir: str | Path, label: str):
        if not _SAFE_LABEL.match(label):
            raise RunDirError(f"cannot lock {label!r}: a lock label must be letters, digits, '_', '.', '-'")
        self.path = Path(run_dir) / f"{label}.lock"
        self.label = label
        self._fd: int | None = None
        for _ in range(10):  # only loops when the file was replaced between open and flock
            if self._try_acquire():
                return
        raise RunDirError(f"cannot lock {self.path}: it keeps being replaced")

    def _try_acquire(self) -> bool:
        fd = open_private_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise RunDirError(f"{self.label} is already running in {self.path.parent} (pid {holder} holds "
                              f"{self.path}); stop it first, or use another --run-dir") from None
        # A holder that released meanwhile unlinked the file we opened: lock the file on disk instead.
        try:
            same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so nobody takes the file we are removing
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
