"""Maps the repository's top folders into one import namespace: runtime/ -> armada.runtime,
drivers/ -> armada.drivers, calibration/ -> armada.calibration (editable installs too). Everything
else about the distribution is in pyproject.toml; pyproject cannot compute a mapped package list."""

from setuptools import find_packages, setup

FOLDERS = ("runtime", "drivers", "calibration")

setup(
    packages=[f"armada.{p}" for p in find_packages(include=[f"{f}" for f in FOLDERS] + [f"{f}.*" for f in FOLDERS])],
    package_dir={f"armada.{f}": f for f in FOLDERS},
)
