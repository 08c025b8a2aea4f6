"""Fake Dynamixel X-series servos (Protocol 2.0) on a pty, for running dynamixel-sdk without hardware."""

from .dynamixel import DynamixelBusFake

__all__ = ["DynamixelBusFake"]
