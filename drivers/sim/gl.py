"""Which OpenGL MuJoCo renders offscreen with, chosen before mujoco is first imported.

MuJoCo reads ``MUJOCO_GL`` once, at its first import, and a renderer made later under another
backend aborts the whole process. EGL is the fast headless path (Mesa's software EGL here, a GPU's
where there is one); OSMesa (``libosmesa6``) is the fallback where no EGL library is installed. An
operator's own ``MUJOCO_GL`` always wins.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import MutableMapping

# (MUJOCO_GL value, the shared libraries that backend loads), in order of preference.
BACKENDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("egl", ("libEGL.so.1", "libEGL.so")),
    ("osmesa", ("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so")),
)


def choose_gl(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``MUJOCO_GL`` (unless already set) to the first backend whose library loads; return it.

    With neither installed it stays "egl", so MuJoCo's own error names what is missing."""
    env = os.environ if environ is None else environ
    if env.get("MUJOCO_GL"):
        return env["MUJOCO_GL"]
    chosen = next((name for name, libraries in BACKENDS if any(_loads(lib) for lib in libraries)), "egl")
    env["MUJOCO_GL"] = chosen
    return chosen


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True
