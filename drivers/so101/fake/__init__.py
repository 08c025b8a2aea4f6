"""Fake Feetech STS3215 servos on a pty, for running scservo_sdk and lerobot without hardware."""

from .feetech import FeetechBusFake

__all__ = ["FeetechBusFake"]
