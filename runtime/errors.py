"""The error every config loader raises (cells, embodiments, calibration files): what, where, why.

In its own module so that loaders of other file kinds (calibration/results.py) need not import
the cell loader, which imports them back to check the files a cell names.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(Exception):
    def __init__(self, file: str | Path, key: str, reason: str):
        super().__init__(f"{file}: {key or '<top>'}: {reason}")
        self.file, self.key, self.reason = str(file), key, reason
