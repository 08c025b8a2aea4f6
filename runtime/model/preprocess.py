"""Run a bundle's preprocessing steps on camera frames.

The steps are data in the manifest, not code paths: flips, JPEG round trips, crops and the
per-backbone normalizations that change a checkpoint's actions when they are wrong are all
stated there and executed here in order. numpy and OpenCV only.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from armada.runtime.model.bundle import CenterCrop, JpegRoundtrip, Normalize, Resize, Rotate180, ToFloat

_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}


class PreprocessError(ValueError):
    """A frame cannot go through the bundle's steps (wrong type or shape); says which and why."""


def run_steps(image: np.ndarray, steps: Sequence[object]) -> dict[str, np.ndarray]:
    """One RGB frame (H, W, 3) uint8 through the steps; returns {backbone target: (3, S, S) float32}."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise PreprocessError(f"frames must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    img: np.ndarray = image
    outputs: dict[str, np.ndarray] = {}
    for step in steps:
        if isinstance(step, Normalize):
            mean = np.asarray(step.mean, np.float32)
            std = np.asarray(step.std, np.float32)
            outputs[step.target] = np.ascontiguousarray(((img - mean) / std).transpose(2, 0, 1), np.float32)
        else:
            img = apply_step(img, step)
    if not outputs:
        raise PreprocessError("the preprocessing steps produce no backbone input (no normalize step)")
    return outputs


def apply_step(img: np.ndarray, step: object) -> np.ndarray:
    if isinstance(step, Resize):
        return _resize(img, step.size, step.size, step.interpolation, step.antialias)
    if isinstance(step, CenterCrop):
        h, w = img.shape[:2]
        side = math.sqrt(step.area_fraction)
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        top, left = (h - ch) // 2, (w - cw) // 2
        return _resize(img[top:top + ch, left:left + cw], h, w, step.interpolation, False)
    if isinstance(step, Rotate180):
        return np.ascontiguousarray(img[::-1, ::-1])
    if isinstance(step, JpegRoundtrip):
        ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, step.quality])
        if not ok:
            raise PreprocessError("JPEG encoding failed")
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()
    if isinstance(step, ToFloat):
        return img.astype(np.float32) / 255.0
    raise PreprocessError(f"unknown preprocessing step {step!r}")


def _resize(img: np.ndarray, height: int, width: int, interpolation: str, antialias: bool) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    shrinking = height < img.shape[0] or width < img.shape[1]
    # INTER_AREA is OpenCV's antialiased downscale; the named filter is used to upscale.
    flag = cv2.INTER_AREA if antialias and shrinking else _INTERPOLATION[interpolation]
    return cv2.resize(img, (width, height), interpolation=flag)


def preprocess_cameras(frames: dict[str, np.ndarray], cameras: list[str],
                       steps: dict[str, Sequence[object]], targets: list[str]) -> dict[str, np.ndarray]:
    """All cameras, in the bundle's camera order: {target: (num_images, 3, S, S)}."""
    missing = [c for c in cameras if c not in frames]
    if missing:
        raise PreprocessError(f"the bundle needs cameras {cameras}; missing {missing} "
                              f"(the cell has {sorted(frames)}): map them in the cell's policy section")
    per_camera = [run_steps(frames[c], steps[c]) for c in cameras]
    out = {}
    for target in targets:
        if any(target not in p for p in per_camera):
            raise PreprocessError(f"every camera's steps must produce an input for backbone {target!r}")
        out[target] = np.stack([p[target] for p in per_camera])
    return out
