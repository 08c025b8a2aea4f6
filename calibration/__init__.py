"""Camera intrinsics, hand-eye, joint offsets and latency calibration (to come)."""
