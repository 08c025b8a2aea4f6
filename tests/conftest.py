import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zmq

# MuJoCo picks its GL backend at its first import; a test module's importorskip("mujoco") may come
# before any of ours sets it, and a renderer under the wrong backend aborts the whole test process.
os.environ.setdefault("MUJOCO_GL", "egl")


SLOW_REASON = ("slow: a long proof, skipped by default to keep the suite in minutes on two cores; "
               "run with --run-slow (or -m slow, or ARMADA_RUN_SLOW=1)")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (long proofs: the eval pipeline, the fault matrix, the fleet)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow are skipped, saying so, unless asked for: --run-slow, ARMADA_RUN_SLOW=1, or a
    -m expression that selects them."""
    markexpr = config.getoption("markexpr") or ""
    wanted = (config.getoption("--run-slow") or os.environ.get("ARMADA_RUN_SLOW") == "1"
              or ("slow" in markexpr and "not slow" not in markexpr))
    if wanted:
        return
    skip = pytest.mark.skip(reason=SLOW_REASON)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
