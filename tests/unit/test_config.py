"""Embodiment and cell configuration: the shipped files load, bad files fail with file, key and reason."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from armada.runtime import protocol
from armada.runtime.config import (
    CONFIG_DIR,
    ConfigError,
    EmbodimentConfig,
    GroupConfig,
    JointLimits,
    load_embodiment,
    resolve_embodiment_path,
)

EMBODIMENTS = sorted((CONFIG_DIR / "embodiments").glob("*.yaml"))
MOCK_ARM = CONFIG_DIR / "embodiments" / "mock_arm.yaml"
MOCK_BIMANUAL = CONFIG_DIR / "embodiments" / "mock_bimanual.yaml"
BASE = yaml.safe_load(MOCK_ARM.read_text())
DESCRIBE_KEYS = {"embodiment", "control_rate_hz", "joint_names", "groups", "action_dim", "lower", "upper",
                 "max_velocity", "max_acceleration", "max_engage_distance"}


def write(tmp_path: Path, data: Any = None, text: str | None = None, name: str = "emb.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(path: Path | str, loader: Callable[[Any], Any] = load_embodiment) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)
    err = info.value
    assert err.file == str(path)
    assert isinstance(err.reason, str) and err.reason
    assert str(path) in str(err) and err.reason in str(err) and (err.key or "<top>") in str(err)
    return err


def edited(edit: Callable[[dict], Any]) -> dict:
    data = copy.deepcopy(BASE)
    edit(data)
    return data


def joint(data: dict, g: int, j: int) -> dict:
    return data["groups"][g]["joints"][j]


# --------------------------------------------------------------------------- the shipped embodiments


def test_the_shipped_embodiments_are_found():
    assert MOCK_ARM in EMBODIMENTS and MOCK_BIMANUAL in EMBODIMENTS


@pytest.mark.parametrize("path", EMBODIMENTS, ids=[p.stem for p in EMBODIMENTS])
def test_every_shipped_embodiment_loads_and_is_consistent(path):
    emb = load_embodiment(path)
    assert load_embodiment(path.stem) == emb  # by name and by path
    assert emb.name == path.stem
    n = emb.dof
    assert n == len(emb.joint_names) == len(set(emb.joint_names)) > 0
    for arr in (emb.lower, emb.upper, emb.max_velocity, emb.max_acceleration, emb.home):
        assert arr.shape == (n,) and arr.dtype == np.float64 and np.all(np.isfinite(arr))
    assert np.all(emb.lower < emb.upper)
    assert np.all((emb.lower <= emb.home) & (emb.home <= emb.upper))
    assert np.all(emb.max_velocity > 0) and np.all(emb.max_acceleration > 0)
    mask = emb.gripper_mask()
    assert mask.shape == (n,) and mask.dtype == bool
    # the groups tile the action vector, in order, without gaps
    slices = emb.group_slices()
    assert list(slices) == [g.name for g in emb.groups]
    start = 0
    for g in emb.groups:
        s = slices[g.name]
        assert (s.start, s.stop, s.step) == (start, start + len(g.joints), None)
        assert emb.joint_names[s] == [j.name for j in g.joints]
        assert mask[s].tolist() == [g.mode == "gripper_position"] * len(g.joints)
        start = s.stop
    assert start == n
    # what the driver announces in hello travels over the wire intact
    desc = emb.describe()
    assert set(desc) == DESCRIBE_KEYS
    hello = protocol.MessageFactory().make("hello", version=protocol.PROTOCOL_VERSION, role="driver", description=desc)
    got = protocol.decode_valid(protocol.encode(hello))["description"]
    assert got["joint_names"] == emb.joint_names and got["action_dim"] == n
    assert got["groups"] == desc["groups"]
    for key in ("lower", "upper", "max_velocity", "max_acceleration"):
        np.testing.assert_array_equal(got[key], desc[key])
        assert got[key].dtype == np.float64


def test_mock_arm():
    emb = load_embodiment("mock_arm")
    assert emb.name == "mock_arm" and emb.dof == 7 and emb.control_rate_hz == 500
    assert emb.joint_names == ["shoulder_pan", "shoulder_lift", "elbow", "wrist_1", "wrist_2", "wrist_3", "gripper"]
    assert emb.group_slices() == {"arm": slice(0, 6), "gripper": slice(6, 7)}
    assert emb.gripper_mask().tolist() == [False] * 6 + [True]
    np.testing.assert_allclose(emb.home, [0.0, -1.57, 1.57, -1.57, -1.57, 0.0, 0.04])
    np.testing.assert_allclose(emb.lower, [-6.2, -6.2, -3.1, -6.2, -6.2, -6.2, 0.0])
    np.testing.assert_allclose(emb.upper, [6.2, 6.2, 3.1, 6.2, 6.2, 6.2, 0.085])
    np.testing.assert_allclose(emb.max_velocity, [3.14, 3.14, 3.14, 6.28, 6.28, 6.28, 0.15])
    assert emb.position_margin == 0.01 and emb.max_engage_distance == 0.2
    assert emb.move_to_velocity_fraction == 0.25 and emb.state_decimation == 1  # defaults
    desc = emb.describe()
    assert desc["embodiment"] == "mock_arm" and desc["control_rate_hz"] == 500 and desc["action_dim"] == 7
    assert desc["joint_names"] == emb.joint_names
    assert desc["groups"] == [
        {"name": "arm", "mode": "joint_position",
         "joints": ["shoulder_pan", "shoulder_lift", "elbow", "wrist_1", "wrist_2", "wrist_3"]},
        {"name": "gripper", "mode": "gripper_position", "joints": ["gripper"]},
    ]
    np.testing.assert_array_equal(desc["lower"], emb.lower)
    np.testing.assert_array_equal(desc["upper"], emb.upper)
    np.testing.assert_array_equal(desc["max_acceleration"], [10.0] * 3 + [20.0] * 3 + [1.5])


def test_mock_bimanual():
    emb = load_embodiment("mock_bimanual")
    assert emb.name == "mock_bimanual" and emb.dof == 14 and emb.control_rate_hz == 50
    assert emb.group_slices() == {"left_arm": slice(0, 6), "left_gripper": slice(6, 7),
                                  "right_arm": slice(7, 13), "right_gripper": slice(13, 14)}
    mask = emb.gripper_mask()
    assert np.flatnonzero(mask).tolist() == [6, 13]
    assert [n.split("_", 1)[1] for n in emb.joint_names[:7]] == [n.split("_", 1)[1] for n in emb.joint_names[7:]]
    assert all(n.startswith("left_") for n in emb.joint_names[:7])
    assert all(n.startswith("right_") for n in emb.joint_names[7:])
    for column in (emb.lower, emb.upper, emb.home, emb.max_velocity, emb.max_acceleration):
        np.testing.assert_array_equal(column[:7], column[7:])  # the two arms are the same arm
    desc = emb.describe()
    assert desc["action_dim"] == 14 and len(desc["groups"]) == 4
    assert [g["mode"] for g in desc["groups"]] == ["joint_position", "gripper_position"] * 2


def test_a_gripper_group_may_hold_a_joint_of_the_same_name(tmp_path):
    # groups and joints are separate namespaces (both shipped files rely on it)
    emb = load_embodiment(write(tmp_path, BASE))
    assert emb.groups[1].name == "gripper" and emb.groups[1].joints[0].name == "gripper"


def test_embodiment_path_resolution(tmp_path):
    assert resolve_embodiment_path("mock_arm") == MOCK_ARM
    assert resolve_embodiment_path("x.yaml", tmp_path) == tmp_path / "x.yaml"
    assert resolve_embodiment_path("x.yml", tmp_path) == tmp_path / "x.yml"
    assert resolve_embodiment_path(tmp_path / "x.yaml", Path("/elsewhere")) == tmp_path / "x.yaml"
    write(tmp_path, edited(lambda d: d.update(name="mine")), name="mine.yaml")
    assert load_embodiment("mine.yaml", relative_to=tmp_path).name == "mine"


def test_models_are_frozen():
    emb = load_embodiment("mock_arm")
    with pytest.raises(ValidationError):
        emb.control_rate_hz = 1000
    with pytest.raises(ValidationError):
        emb.groups[0].joints[0].max_velocity = 100.0


def test_models_validate_directly():
    good = dict(name="j", min=-1.0, max=1.0, max_velocity=1.0, max_acceleration=1.0)
    assert JointLimits(**good).home == 0.0
    for bad in ({"min": 1.0}, {"max": -1.0}, {"home": 2.0}, {"max_velocity": 0.0}, {"max_acceleration": -1.0},
                {"max_velocity": float("inf")}, {"min": float("nan")}, {"extra": 1}):
        with pytest.raises(ValidationError):
            JointLimits(**{**good, **bad})
    with pytest.raises(ValidationError):
        GroupConfig(name="g", joints=[])
    with pytest.raises(ValidationError):
        GroupConfig(name="g", mode="torque", joints=[good])
    with pytest.raises(ValidationError):
        EmbodimentConfig(name="e", control_rate_hz=100, groups=[{"name": "g", "joints": [good, good]}])
    emb = EmbodimentConfig(name="e", control_rate_hz=100,
                           groups=[{"name": "a", "joints": [good]},
                                   {"name": "b", "mode": "gripper_position", "joints": [{**good, "name": "k"}]}])
    assert emb.dof == 2 and emb.gripper_mask().tolist() == [False, True]


# --------------------------------------------------------------------------- errors: file, key path, reason


def _del(path: list) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]
    return edit


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value
    return edit


CASES = [
    # id, edit, key, fragment of the reason
    ("missing_max_velocity", _del(["groups", 0, "joints", 1, "max_velocity"]), "groups.0.joints.1.max_velocity",
     "required"),
    ("missing_name", _del(["name"]), "name", "required"),
    ("missing_groups", _del(["groups"]), "groups", "required"),
    ("missing_joint_min", _del(["groups", 1, "joints", 0, "min"]), "groups.1.joints.0.min", "required"),
    ("min_above_max", lambda d: joint(d, 0, 1).update(min=2.0, max=1.0, home=1.5), "groups.0.joints.1", "min"),
    ("min_equals_max", lambda d: joint(d, 0, 2).update(min=1.0, max=1.0, home=1.0), "groups.0.joints.2", "below max"),
    ("home_above_range", _set(["groups", 0, "joints", 1, "home"], 7.0), "groups.0.joints.1", "home"),
    ("home_below_range", _set(["groups", 1, "joints", 0, "home"], -0.01), "groups.1.joints.0", "home"),
    ("negative_velocity", _set(["groups", 0, "joints", 1, "max_velocity"], -1.0), "groups.0.joints.1.max_velocity",
     "greater than 0"),
    ("zero_velocity", _set(["groups", 0, "joints", 3, "max_velocity"], 0), "groups.0.joints.3.max_velocity",
     "greater than 0"),
    ("negative_acceleration", _set(["groups", 1, "joints", 0, "max_acceleration"], -2),
     "groups.1.joints.0.max_acceleration", "greater than 0"),
    ("infinite_velocity", _set(["groups", 0, "joints", 1, "max_velocity"], float("inf")),
     "groups.0.joints.1.max_velocity", "finite"),
    ("nan_min", _set(["groups", 0, "joints", 0, "min"], float("nan")), "groups.0.joints.0.min", "finite"),
    ("infinite_home", _set(["groups", 0, "joints", 0, "home"], float("-inf")), "groups.0.joints.0.home", "finite"),
    ("infinite_margin", _set(["position_margin"], float("inf")), "position_margin", "finite"),
    ("unknown_joint_key", _set(["groups", 0, "joints", 1, "max_vel"], 1.0), "groups.0.joints.1.max_vel", "Extra"),
    ("unknown_group_key", _set(["groups", 1, "colour"], "red"), "groups.1.colour", "Extra"),
    ("unknown_top_key", _set(["control_rate"], 500), "control_rate", "Extra"),
    ("duplicate_joint_in_group", _set(["groups", 0, "joints", 2, "name"], "shoulder_lift"), "groups",
     "shoulder_lift"),
    ("duplicate_joint_across_groups", _set(["groups", 1, "joints", 0, "name"], "elbow"), "groups", "elbow"),
    ("duplicate_group", _set(["groups", 1, "name"], "arm"), "groups", "arm"),
    ("bad_mode", _set(["groups", 1, "mode"], "torque"), "groups.1.mode", "gripper_position"),
    ("no_joints", _set(["groups", 1, "joints"], []), "groups.1.joints", "at least 1"),
    ("no_groups", _set(["groups"], []), "groups", "at least 1"),
    ("zero_rate", _set(["control_rate_hz"], 0), "control_rate_hz", "greater than or equal to 1"),
    ("milli_hz_rate", _set(["control_rate_hz"], 0.001), "control_rate_hz", "greater than or equal to 1"),
    ("absurd_rate", _set(["control_rate_hz"], 50_000), "control_rate_hz", "2000"),
    ("joint_name_not_str", _set(["groups", 0, "joints", 1, "name"], 5), "groups.0.joints.1.name", "string"),
    ("min_not_a_number", _set(["groups", 0, "joints", 1, "min"], "low"), "groups.0.joints.1.min", "number"),
    ("joints_not_a_list", _set(["groups", 0, "joints"], {"name": "x"}), "groups.0.joints", "list"),
    ("decimation_zero", _set(["state_decimation"], 0), "state_decimation", "greater than or equal to 1"),
    ("fraction_above_one", _set(["move_to_velocity_fraction"], 1.5), "move_to_velocity_fraction", "less than"),
]


@pytest.mark.parametrize("edit,key,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_embodiment_names_file_key_and_reason(tmp_path, edit, key, fragment):
    path = write(tmp_path, edited(edit))
    err = load_error(path)
    assert err.key == key, f"{err.key!r}: {err.reason}"
    assert fragment.lower() in err.reason.lower(), err.reason


def test_several_problems_are_counted(tmp_path):
    def edit(d):
        joint(d, 0, 1)["max_velocity"] = -1.0
        joint(d, 0, 2)["max_acceleration"] = -1.0
        d["unknown"] = 1
    err = load_error(write(tmp_path, edited(edit)))
    assert err.key == "groups.0.joints.1.max_velocity"
    assert "(and 2 more problems)" in err.reason


REAL_TEXT = MOCK_ARM.read_text()
REAL_LINES = REAL_TEXT.splitlines()
ELBOW_LINE = next(i for i, line in enumerate(REAL_LINES, 1) if "name: elbow" in line)


@pytest.mark.parametrize("text,line,fragment", [
    ("name: x\ncontrol_rate_hz: 10\n\tgroups: []\n", 3, "YAML"),
    ("name: x\ncontrol_rate_hz: 10: 20\n", 2, "mapping values"),
    ("name: x\ngroups:\n  - name: a\n    joints: [\n", 5, "YAML"),
    ("name: [x\n", 2, "YAML"),
    ("name: 'x\n", 2, "YAML"),
    ("name: !!python/object/apply:os.system ['true']\n", 1, "constructor"),
    (REAL_TEXT.replace("{name: elbow,", "{name: elbow,,: :"), ELBOW_LINE, "YAML"),
    (REAL_TEXT.replace("{name: elbow,", "{name: elbow, max_velocity: 99.0,"), ELBOW_LINE, "duplicate key 'max_velocity'"),
    ("name: a\nname: b\n", 2, "duplicate key 'name'"),
], ids=["tab", "double_colon", "unclosed_flow_at_eof", "unclosed_bracket", "unclosed_quote", "python_tag",
        "garbage_in_real_file", "duplicate_key_in_real_file", "duplicate_top_key"])
def test_invalid_yaml_names_the_line(tmp_path, text, line, fragment):
    err = load_error(write(tmp_path, text=text))
    assert err.key == f"line {line}", f"{err.key!r}: {err.reason}"
    assert fragment.lower() in err.reason.lower(), err.reason


def test_unsafe_yaml_tags_do_nothing(tmp_path):
    marker = tmp_path / "marker"
    err = load_error(write(tmp_path, text=f"name: !!python/object/apply:builtins.open ['{marker}', 'w']\n"))
    assert err.key == "line 1"
    assert not marker.exists()


def test_yaml_anchors_and_merge_keys_are_refused_naming_the_line(tmp_path):
    # Aliases are expanded by the loader and by everything that walks the data after it: refused,
    # with where, so the operator writes the values out.
    text = """
name: merged
control_rate_hz: 100
groups:
  - name: arm
    joints:
      - &lim {name: a, min: -1.0, max: 1.0, max_velocity: 2.0, max_acceleration: 5.0}
      - {<<: *lim, name: b, max_velocity: 3.0}
"""
    err = load_error(write(tmp_path, text=text))
    assert err.key == "line 7", err
    assert "alias" in err.reason and "anchor" in err.reason


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "name: laughs\ncontrol_rate_hz: 100\n" + "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_at_once_without_expanding(tmp_path):
    import time

    from armada.runtime.config import load_cell

    path = write(tmp_path, text=_billion_laughs(), name="cell.yaml")
    t = time.monotonic()
    err = load_error(path, lambda p: load_cell(p, run_dir=tmp_path))  # was: 57 s, then a MemoryError
    assert time.monotonic() - t < 2.0
    assert err.key == "line 3" and "alias" in err.reason


@pytest.mark.parametrize("text", [
    "name: " + "[" * 5000 + "]" * 5000 + "\n",
    "".join(" " * i + f"k{i}:\n" for i in range(600)) + " " * 600 + "x: 1\n",
    "name: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
], ids=["flow_sequences", "block_mappings", "flow_mappings"])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(tmp_path, text):
    err = load_error(write(tmp_path, text=text))
    assert "nested deeper than" in err.reason and err.key.startswith("line ")


def test_a_file_too_large_to_be_a_config_is_refused_unread(tmp_path):
    from armada.runtime.config import MAX_CONFIG_BYTES

    path = write(tmp_path, text="# padding\n" * (MAX_CONFIG_BYTES // 10 + 1) + yaml.safe_dump(BASE))
    err = load_error(path)
    assert err.key == "" and "larger than" in err.reason


@pytest.mark.parametrize("text,fragment", [("", "dictionary"), ("- 1\n- 2\n", "dictionary"), ("42\n", "dictionary"),
                                           ("~\n", "dictionary")])
def test_top_level_must_be_a_mapping(tmp_path, text, fragment):
    err = load_error(write(tmp_path, text=text))
    assert err.key == "" and "<top>" in str(err)
    assert fragment in err.reason


def test_missing_file(tmp_path):
    err = load_error(tmp_path / "absent.yaml")
    assert err.key == "" and "cannot read" in err.reason and "No such file" in err.reason


def test_unknown_embodiment_name():
    with pytest.raises(ConfigError) as info:
        load_embodiment("no_such_robot")
    assert info.value.file.endswith("no_such_robot.yaml") and "cannot read" in info.value.reason


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    err = load_error(tmp_path / "dir.yaml")
    assert "cannot read" in err.reason


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, BASE)
    path.chmod(0)
    try:
        err = load_error(path)
    finally:
        path.chmod(0o644)
    assert "cannot read" in err.reason and "ermission" in err.reason


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    # the same path as test_unreadable_file, for when the suite runs as root
    path = write(tmp_path, BASE)
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    err = load_error(path)
    assert err.key == "" and err.reason == "cannot read: Permission denied"


def test_not_utf8(tmp_path):
    path = tmp_path / "emb.yaml"
    path.write_bytes(b"name: \xff\xfe robot\n")
    err = load_error(path)
    assert "UTF-8" in err.reason


def test_config_error_attributes():
    err = ConfigError(Path("/a/b.yaml"), "groups.0.joints.1.max_velocity", "must be > 0")
    assert err.file == "/a/b.yaml" and isinstance(err.file, str)
    assert err.key == "groups.0.joints.1.max_velocity" and err.reason == "must be > 0"
    assert str(err) == "/a/b.yaml: groups.0.joints.1.max_velocity: must be > 0"
    assert str(ConfigError("c.yaml", "", "empty")) == "c.yaml: <top>: empty"
    assert isinstance(err, Exception)


# --------------------------------------------------------------------------- property: arbitrary embodiments

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)


@st.composite
def embodiments(draw) -> dict:
    n_groups = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 7)) for _ in range(n_groups)]
    names = draw(st.lists(NAMES, min_size=sum(sizes), max_size=sum(sizes), unique=True))
    group_names = draw(st.lists(NAMES, min_size=n_groups, max_size=n_groups, unique=True))
    groups, k = [], 0
    for g, size in enumerate(sizes):
        mode = draw(st.sampled_from(["joint_position", "gripper_position", "lift_height", "base_velocity"]))
        joints = []
        for _ in range(size):
            if mode == "base_velocity":  # bounds a velocity: zero (at rest) inside, home at rest, a jerk limit
                lo, hi = draw(st.floats(-10, -1e-3)), draw(st.floats(1e-3, 10))
                extra = {"home": 0.0, "max_jerk": draw(st.floats(1e-3, 1e4))}
            else:
                lo = draw(st.floats(-10, 9.9, allow_nan=False))
                hi = draw(st.floats(lo, 10, allow_nan=False).filter(lambda h, lo=lo: h > lo))
                extra = {"home": draw(st.floats(lo, hi))}
            joints.append({"name": names[k], "min": lo, "max": hi, **extra,
                           "max_velocity": draw(st.floats(1e-3, 100)), "max_acceleration": draw(st.floats(1e-3, 1e3))})
            k += 1
        groups.append({"name": group_names[g], "mode": mode, "joints": joints})
    return {"name": "generated", "control_rate_hz": draw(st.floats(1, 2000)), "groups": groups}


FAULTS = {
    "min_not_below_max": (lambda j: j.update(min=j["max"]), "", "below max"),
    "home_outside": (lambda j: j.update(home=j["max"] + 1.0), "", "outside"),
    "negative_velocity": (lambda j: j.update(max_velocity=-j["max_velocity"]), ".max_velocity", "greater than 0"),
    "missing_acceleration": (lambda j: j.pop("max_acceleration"), ".max_acceleration", "required"),
    "extra_key": (lambda j: j.update(torque_limit=1.0), ".torque_limit", "extra"),
    "nan_max": (lambda j: j.update(max=float("nan")), ".max", "finite"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=embodiments(), fault=st.sampled_from(sorted(FAULTS)), pick=st.data())
def test_arbitrary_embodiments_load_and_faults_point_at_the_joint(data, fault, pick):
    with tempfile.TemporaryDirectory() as tmp:
        emb = load_embodiment(write(Path(tmp), data))
        flat = [j for g in data["groups"] for j in g["joints"]]
        assert emb.dof == len(flat) and emb.joint_names == [j["name"] for j in flat]
        np.testing.assert_array_equal(emb.lower, [j["min"] for j in flat])
        np.testing.assert_array_equal(emb.upper, [j["max"] for j in flat])
        assert sum(s.stop - s.start for s in emb.group_slices().values()) == emb.dof

        g = pick.draw(st.integers(0, len(data["groups"]) - 1), label="group")
        j = pick.draw(st.integers(0, len(data["groups"][g]["joints"]) - 1), label="joint")
        edit, suffix, fragment = FAULTS[fault]
        bad = copy.deepcopy(data)
        edit(bad["groups"][g]["joints"][j])
        err = load_error(write(Path(tmp), bad, name="bad.yaml"))
        assert err.key == f"groups.{g}.joints.{j}{suffix}", (err.key, err.reason)
        assert fragment.lower() in err.reason.lower(), err.reason


# --------------------------------------------------------------------------- cells (need runtime.transport)


CELL = {
    "name": "test",
    "drivers": [{"name": "arm", "embodiment": "mock_arm", "backend": {"kind": "mock"}, "state": "ipc://{run_dir}/arm-state",
                 "cmd": "ipc://{run_dir}/arm-cmd"}],
    "cameras": [{"name": "front", "frames": "ipc://{run_dir}/cam-front"},
                {"name": "wrist", "frames": "tcp://127.0.0.1:5601"}],
    "plain_tcp_loopback": True,  # the wrist camera on plain loopback TCP needs the opt-in
    "inference": {"ctl": "ipc://{run_dir}/ctl", "events": "ipc://{run_dir}/events"},
}


def _cell(tmp_path: Path, edit: Callable[[dict], Any] | None = None, name: str = "cell.yaml") -> Path:
    data = copy.deepcopy(CELL)
    if edit:
        edit(data)
    return write(tmp_path, data, name=name)


def test_load_cell(tmp_path):
    pytest.importorskip("armada.runtime.transport")
    from armada.runtime.config import driver_embodiment, load_cell

    run_dir = tmp_path / "run"
    path = _cell(tmp_path)
    cell = load_cell(path, run_dir=run_dir)
    assert cell.name == "test" and len(cell.drivers) == 1 and len(cell.cameras) == 2
    drv = cell.driver(None)
    assert drv.name == "arm" and drv.state == f"ipc://{run_dir}/arm-state" and drv.cmd == f"ipc://{run_dir}/arm-cmd"
    assert cell.camera("front").frames == f"ipc://{run_dir}/cam-front"
    assert cell.inference.ctl == f"ipc://{run_dir}/ctl"
    assert cell.inference.chunking.merge in protocol.MERGE_MODES
    assert driver_embodiment(path, drv) == load_embodiment("mock_arm")
    with pytest.raises(ConfigError):
        cell.camera(None)  # two cameras: which one?
    with pytest.raises(ConfigError) as info:
        cell.driver("nope")
    assert info.value.file == str(path)  # the loaded cell remembers its file
    assert cell.path == path and cell.folder == tmp_path
    assert cell.embodiment(drv) == load_embodiment("mock_arm")
    assert cell.resolve("cal/wrist.yaml") == tmp_path / "cal" / "wrist.yaml"
    assert cell.resolve("/abs/x.yaml") == Path("/abs/x.yaml")


@pytest.mark.parametrize("name", ["default", "bimanual"])
def test_shipped_cells_load(tmp_path, name):
    pytest.importorskip("armada.runtime.transport")
    from armada.runtime.config import driver_embodiment, load_cell

    path = CONFIG_DIR / "cells" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    cell = load_cell(path, run_dir=tmp_path)
    for drv in cell.drivers:
        emb = driver_embodiment(path, drv)
        assert emb.dof > 0
        assert "{run_dir}" not in drv.state and "{run_dir}" not in drv.cmd


def test_cell_rate_override_and_relative_embodiment(tmp_path):
    pytest.importorskip("armada.runtime.transport")
    from armada.runtime.config import driver_embodiment, load_cell

    (tmp_path / "robots").mkdir()
    write(tmp_path / "robots", edited(lambda d: d.update(name="custom")), name="custom.yaml")

    def edit(d):
        d["drivers"][0].update(embodiment="robots/custom.yaml", control_rate_hz=125)
    path = _cell(tmp_path, edit)
    cell = load_cell(path, run_dir=tmp_path)
    emb = driver_embodiment(path, cell.drivers[0])
    assert emb.name == "custom" and emb.control_rate_hz == 125


@pytest.mark.parametrize("edit,key,fragment", [
    (lambda d: d["drivers"][0].update(embodiment="no_such_robot"), "drivers.0.embodiment", "no embodiment file"),
    (lambda d: d["drivers"][0].update(embodiment="missing.yaml"), "drivers.0.embodiment", "no embodiment file"),
    (lambda d: d["drivers"][0].update(state="tcp://10.1.2.3:5555"), "drivers.0.state", "loopback"),
    (lambda d: d["cameras"][0].update(frames="udp://127.0.0.1:1"), "cameras.0.frames", "scheme"),
    (lambda d: d["inference"].update(events="tcp://127.0.0.1"), "inference.events", "host:port"),
    (lambda d: d["drivers"][0].update(lease_ttl_s=0), "drivers.0.lease_ttl_s", "greater than or equal to 0.01"),
    (lambda d: d["drivers"][0].update(control_rate_hz=0.001), "drivers.0.control_rate_hz",
     "greater than or equal to 1"),
    (lambda d: d["cameras"][0].update(fps=0.001), "cameras.0.fps", "greater than or equal to 1"),
    (lambda d: d["inference"].update(chunking={"dt": 5e-324}), "inference.chunking.dt", "greater than or equal"),
    (lambda d: d["inference"].update(heartbeat_s=0.3), "inference.heartbeat_s", "drivers.0.lease_ttl_s"),
    (lambda d: d["inference"].update(heartbeat_s=0.16), "inference.heartbeat_s", "at most half"),
    (lambda d: d["drivers"][0].update(speed=1), "drivers.0.speed", "extra"),
    (lambda d: d["inference"].update(chunking={"merge": "blend"}),
     "inference.chunking.merge", "replace"),
    (lambda d: d.update(drivers=[]), "drivers", "at least 1"),
    (lambda d: d["cameras"][1].update(name="arm"), "drivers/cameras", "unique"),
    (lambda d: d.pop("inference"), "inference", "required"),
], ids=["unknown_embodiment", "missing_embodiment_file", "plain_tcp_off_host", "bad_scheme", "no_port", "zero_ttl",
        "milli_hz_driver_rate", "milli_hz_camera", "denormal_chunk_dt", "heartbeat_equals_ttl",
        "heartbeat_over_half_ttl", "extra_key", "bad_merge", "no_drivers", "duplicate_names", "no_inference"])
def test_bad_cell_names_file_key_and_reason(tmp_path, edit, key, fragment):
    pytest.importorskip("armada.runtime.transport")
    from armada.runtime.config import load_cell

    path = _cell(tmp_path, edit)
    err = load_error(path, lambda p: load_cell(p, run_dir=tmp_path))
    assert err.key == key, f"{err.key!r}: {err.reason}"
    assert fragment.lower() in err.reason.lower(), err.reason


def test_tcp_between_hosts_is_allowed_with_curve(tmp_path):
    pytest.importorskip("armada.runtime.transport")
    from armada.runtime.config import load_cell

    def edit(d):
        d["drivers"][0].update(state="tcp://10.1.2.3:5555")
        d["curve"] = {"server_public_key": str(tmp_path / "server.key"),
                      "authorized_clients": str(tmp_path / "clients")}
    cell = load_cell(_cell(tmp_path, edit), run_dir=tmp_path)
    assert cell.curve is not None and cell.drivers[0].state == "tcp://10.1.2.3:5555"
