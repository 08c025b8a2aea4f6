"""`armada run --record DIR`: placeholder until the recorder lands (issue 11)."""

from __future__ import annotations

from pathlib import Path


class AutonomousRecorder:
    """Records every episode of a running cell (following the inference events) to a dataset."""

    @classmethod
    def start(cls, procs, dataset: Path, repo_id: str | None) -> "AutonomousRecorder":
        raise SystemExit("armada run --record: not built yet")

    def close(self) -> None:
        pass
