"""Calibration: camera intrinsics, hand-eye, joint offsets and ranges, camera latency.

Cells load results through ``calibration.results``: ``load_intrinsics``, ``load_hand_eye``,
``load_joint_calibration`` and ``load_latency`` (plain values from ``calibration.types`` and
``calibration.joints``). ``calibration.cli`` holds ``armada calibrate ...``.
"""
