"""A fake PiPer controller on a python-can virtual bus, for tests without hardware."""

from armada.drivers.piper.fake.firmware import PiperFirmware

__all__ = ["PiperFirmware"]
