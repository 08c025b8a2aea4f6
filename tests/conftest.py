import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

# MuJoCo picks its GL backend at its first import; a test module's importorskip("mujoco") may come
# before any of ours sets it, and a renderer under the wrong backend aborts the whole test process.
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def short_tmp():
    """A short folder for ipc sockets (ipc paths are limited to about 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="armada-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def ur_fake():
    """The loopback UR controller in its own process, on a free 127.x.y.z address."""
    from armada.drivers.ur3.fake.launch import FakeStartError, FakeUR

    try:
        fake = FakeUR.start_anywhere()
    except FakeStartError as exc:
        pytest.skip(str(exc))
    yield fake
    fake.close()
