"""The offscreen GL choice: the operator's MUJOCO_GL wins, else EGL, else OSMesa (issue 12)."""

from __future__ import annotations

from armada.drivers.sim import gl


def test_the_operators_choice_wins():
    env = {"MUJOCO_GL": "osmesa"}
    assert gl.choose_gl(env) == "osmesa" and env["MUJOCO_GL"] == "osmesa"


def test_egl_first_then_osmesa_then_egl_for_mujocos_own_error(monkeypatch):
    for present, expected in (({"libEGL.so.1", "libOSMesa.so.8"}, "egl"), ({"libOSMesa.so.6"}, "osmesa"),
                              (set(), "egl")):
        monkeypatch.setattr(gl, "_loads", lambda lib, present=present: lib in present)
        env: dict[str, str] = {}
        assert gl.choose_gl(env) == expected and env["MUJOCO_GL"] == expected, present


def test_this_machine_has_a_backend_that_loads():
    assert any(gl._loads(lib) for _, libs in gl.BACKENDS for lib in libs)
