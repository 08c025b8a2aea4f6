"""The dataset on disk: lerobot's own writer, made crash-safe one episode at a time.

lerobot closes its parquet writers (footers, metadata buffer) only in ``finalize()``; a dataset
killed before that does not load. So every episode is written by a fresh writer:
``LeRobotDataset.create`` (first) or ``.resume`` (then), ``add_frame``..., ``save_episode()``,
``finalize()``. Resuming makes lerobot start new files (data, videos, meta/episodes), so each
episode lives in its own files and a finished episode is never rewritten.

Crash windows and what recovers them (``recover()``, run before every open):

- killed while frames are added: only lerobot's staging (``images/``, PNGs) exists: removed;
- killed inside save/finalize: a marker ``meta/armada_pending.json`` written before the save names
  the files that existed and holds copies of ``info.json``, ``stats.json`` and ``tasks.parquet``;
  recovery puts those back and deletes every data/video/episode file that was not there before,
  so the half-written episode disappears whole.

Extra per-episode metadata (the routed task, router scores, the recorder's report) goes to a
sidecar ``meta/armada_episodes.jsonl`` keyed by ``episode_index``: lerobot's meta/episodes files
have a fixed column set that every file must share, so extra columns there would break loading.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from armada.runtime.record.align import Row

PENDING = "meta/armada_pending.json"
BACKUP_DIR = "meta/armada_backup"
SIDECAR = "meta/armada_episodes.jsonl"
BACKED_UP = ("meta/info.json", "meta/stats.json", "meta/tasks.parquet")
EPISODE_FILE_DIRS = ("data", "videos", "meta/episodes")
DEFAULT_MIN_FREE_MB = 1024
MAX_PENDING_IMAGES_PER_CAMERA = 16  # about half a second at 30 fps


class RecordError(RuntimeError):
    """Recording cannot go on (full disk, an unwritable dataset); the dataset on disk stays loadable."""


@dataclass
class DatasetSpec:
    repo_id: str
    root: Path
    fps: int
    robot_type: str
    features: dict[str, dict]
    cameras: list[str]  # camera names; feature key observation.images.<name>
    image_writer_threads: int = 4
    min_free_mb: float = DEFAULT_MIN_FREE_MB


def disk_free_mb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e6


def _files_under(root: Path, dirs: tuple[str, ...]) -> list[str]:
    out = []
    for d in dirs:
        base = root / d
        if base.is_dir():
            out += [str(p.relative_to(root)) for p in base.rglob("*") if p.is_file()]
    return sorted(out)


def is_dataset(root: Path) -> bool:
    return (root / "meta" / "info.json").is_file()


def recover(root: Path) -> list[str]:
    """Put a dataset back to its last finished episode; returns what was done (for the operator)."""
    done: list[str] = []
    pending = root / PENDING
    if pending.is_file():
        try:
            marker = json.loads(pending.read_text())
        except (OSError, ValueError) as exc:
            raise RecordError(f"{pending}: unreadable recovery marker ({exc}); move the dataset aside and "
                              "inspect it") from None
        before = set(marker["files_before"])
        for rel in BACKED_UP:
            src = root / BACKUP_DIR / Path(rel).name
            if src.is_file():
                os.replace(src, root / rel)
            elif rel in marker.get("absent", []):
                (root / rel).unlink(missing_ok=True)
        removed = [rel for rel in _files_under(root, EPISODE_FILE_DIRS) if rel not in before]
        for rel in removed:
            (root / rel).unlink()
        _truncate_sidecar(root, int(marker["episode_index"]))
        done.append(f"removed the half-written episode {marker['episode_index']} ({len(removed)} files)")
        pending.unlink()
    if (root / BACKUP_DIR).is_dir():
        shutil.rmtree(root / BACKUP_DIR)
    staging = [root / "images"] + [p for p in root.glob("tmp*") if p.is_dir()]
    for p in staging:
        if p.exists():
            had_files = any(f.is_file() for f in p.rglob("*"))
            shutil.rmtree(p, ignore_errors=True)
            if had_files:
                done.append(f"removed the unsaved frames of an interrupted episode ({p.name}/)")
    return done


def _truncate_sidecar(root: Path, first_removed: int) -> None:
    path = root / SIDECAR
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["episode_index"] < first_removed:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    path.write_text("".join(f"{line}\n" for line in keep))


def read_sidecar(root: Path) -> list[dict[str, Any]]:
    path = root / SIDECAR
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class DatasetStore:
    """Opens lerobot's writer per episode; ``begin``, ``add``..., ``save`` or ``discard``."""

    def __init__(self, spec: DatasetSpec, free_mb: Callable[[Path], float] = disk_free_mb):
        self.spec = spec
        self.free_mb = free_mb
        self.ds: Any = None
        self.recovered: list[str] = []
        self._check_compatible()

    # ------------------------------------------------------------------ opening

    def _check_compatible(self) -> None:
        root = self.spec.root
        if root.exists() and not is_dataset(root) and any(root.iterdir()):
            raise RecordError(f"{root} exists and is not a LeRobot dataset (no meta/info.json): choose a new folder")
        if not is_dataset(root):
            return
        info = json.loads((root / "meta" / "info.json").read_text())
        if int(info["fps"]) != self.spec.fps:
            raise RecordError(f"{root}: the dataset was recorded at {info['fps']} fps, this cell records at "
                              f"{self.spec.fps} fps")
        theirs = {k: (v["dtype"], list(v["shape"])) for k, v in info["features"].items()}
        ours = {k: (v["dtype"], list(v["shape"])) for k, v in self.spec.features.items()}
        for key, val in ours.items():
            if theirs.get(key) != val:
                raise RecordError(f"{root}: feature {key!r} is {theirs.get(key)} in the dataset, {val} here: "
                                  "a different cell; record to a new folder")

    def episodes_on_disk(self) -> int:
        if not is_dataset(self.spec.root):
            return 0
        return int(json.loads((self.spec.root / "meta" / "info.json").read_text())["total_episodes"])

    def check_disk(self) -> None:
        free = self.free_mb(self.spec.root)
        if free < self.spec.min_free_mb:
            raise RecordError(f"disk nearly full: {free:.0f} MB free under {self.spec.root}, the minimum is "
                              f"{self.spec.min_free_mb:.0f} MB (--min-free-mb); recording stopped, the dataset "
                              f"holds {self.episodes_on_disk()} episode(s) and loads")

    def begin(self) -> int:
        """Open a writer for one episode; returns its episode index."""
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.check_disk()
        s = self.spec
        if s.root.exists():
            self.recovered += recover(s.root)
        try:
            if is_dataset(s.root) and self.episodes_on_disk() > 0:
                self.ds = LeRobotDataset.resume(s.repo_id, root=s.root, image_writer_threads=s.image_writer_threads)
            else:
                if s.root.exists():
                    shutil.rmtree(s.root)  # an empty folder, or a dataset created but never given an episode
                self.ds = LeRobotDataset.create(s.repo_id, s.fps, s.features, root=s.root, robot_type=s.robot_type,
                                                use_videos=True, image_writer_threads=s.image_writer_threads)
        except Exception as exc:  # noqa: BLE001 - lerobot and datasets wrap OS errors in their own
            self.ds = None
            raise self._disk_error(exc, "opening the dataset") from exc
        return self.ds.meta.total_episodes

    def add(self, row: Row, task: str) -> None:
        frame: dict[str, Any] = {"observation.state": row.observation, "action": row.action,
                                 "intervention": np.array([row.intervention]), "task": task}
        for cam in self.spec.cameras:
            frame[f"observation.images.{cam}"] = row.images[cam]
        try:
            self.ds.add_frame(frame)
        except Exception as exc:  # noqa: BLE001 - see _disk_error
            raise self._disk_error(exc, "staging a frame") from exc
        self._wait_for_image_writer()

    def _wait_for_image_writer(self) -> None:
        """Backpressure: lerobot's image writer queues images in RAM without a bound. Waiting here
        when it lags makes our own queue grow instead, which spills to disk past its budget."""
        writer = self.ds.writer.image_writer
        q = getattr(writer, "queue", None)
        if q is None:
            return
        limit = MAX_PENDING_IMAGES_PER_CAMERA * max(1, len(self.spec.cameras))
        while q.qsize() > limit:
            time.sleep(0.005)

    def frames(self) -> int:
        return 0 if self.ds is None else int(self.ds.writer.episode_buffer["size"])

    def discard(self) -> None:
        if self.ds is None:
            return
        try:
            self.ds.clear_episode_buffer()
        finally:
            self._drop_writer()
            recover(self.spec.root)

    def save(self, extra: dict[str, Any]) -> int:
        """Write the episode (encode, parquet, metadata), then finalize; returns its index."""
        root = self.spec.root
        index = self.ds.meta.total_episodes
        self._write_marker(index)
        try:
            self.ds.save_episode(parallel_encoding=False)  # no fork: this process has threads (zmq, receiver)
            self.ds.finalize()
            with open(root / SIDECAR, "a") as f:
                f.write(json.dumps({"episode_index": index, **extra}, default=_jsonable) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except Exception as exc:
            self._drop_writer()
            recover(root)
            raise self._disk_error(exc, f"saving episode {index}") from exc
        self.ds = None
        (root / PENDING).unlink()
        shutil.rmtree(root / BACKUP_DIR, ignore_errors=True)
        staging = root / "images"
        if staging.is_dir() and not any(p.is_file() for p in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)  # lerobot leaves the empty folders of its staging
        return index

    def close(self) -> None:
        """Nothing is open between episodes; an episode not saved is discarded."""
        if self.ds is not None:
            self.discard()

    # ------------------------------------------------------------------ internals

    def _write_marker(self, index: int) -> None:
        root = self.spec.root
        backup = root / BACKUP_DIR
        shutil.rmtree(backup, ignore_errors=True)
        backup.mkdir(parents=True)
        absent = []
        for rel in BACKED_UP:
            if (root / rel).is_file():
                shutil.copy2(root / rel, backup / Path(rel).name)
            else:
                absent.append(rel)
        marker = {"episode_index": index, "files_before": _files_under(root, EPISODE_FILE_DIRS), "absent": absent}
        tmp = root / (PENDING + ".tmp")
        tmp.write_text(json.dumps(marker))
        os.replace(tmp, root / PENDING)  # atomic: the marker is whole or absent

    def _drop_writer(self) -> None:
        """Forget a writer without letting lerobot's finalize (run from __del__) write anything more."""
        ds, self.ds = self.ds, None
        if ds is None:
            return
        w = ds.writer
        if w is not None:
            if w.image_writer is not None:
                try:
                    w.image_writer.stop()
                except Exception:  # noqa: BLE001 - best effort on the way out of an error
                    pass
                w.image_writer = None
            w._finalized = True
            ds.meta._finalized = True
            ds.meta._metadata_buffer = []
        ds._is_finalized = True

    def _disk_error(self, exc: BaseException, doing: str) -> RecordError:
        """A RecordError naming the cause; an OS error anywhere in the chain (lerobot, datasets and
        PyAV wrap them) is named by its errno: a full disk reads as one, whoever hit it."""
        os_error = _os_error_in(exc)
        why = repr(exc)
        if os_error is not None:
            why = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file grew past the size limit",
                   errno.EDQUOT: "the disk quota is used up"}.get(os_error.errno or 0, str(os_error))
            why = f"{why} ({os_error})"
        try:
            held = f"{self.episodes_on_disk()} finished episode(s)"
        except (OSError, ValueError, KeyError):
            held = "its finished episodes"
        return RecordError(f"{doing} in {self.spec.root}: {why}; recording stopped, the dataset holds {held} "
                           "and loads")


def _os_error_in(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
