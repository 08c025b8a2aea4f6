"""Teleoperation: a leader arm (or keyboard, gamepad) drives a follower through its driver's safety filter."""
