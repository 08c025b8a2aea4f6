"""``python -m armada.drivers.cameras.fake OUT_DIR``: the fakes that configs/cells/cameras_fake.yaml plays."""

from __future__ import annotations

import argparse
from pathlib import Path

from armada.drivers.cameras.fake.video_file import make_video

RECORDING = "fake_realsense.db3"
VIDEO = "fake_uvc.avi"


def make_all(out: Path, seconds: float = 2.0) -> dict[str, Path]:
    """Both fakes at 320x240, 30 fps (about ``seconds`` to record the RealSense one)."""
    from armada.drivers.cameras.fake.realsense_recording import make_recording

    out.mkdir(parents=True, exist_ok=True)
    rec = make_recording(out / RECORDING, seconds=seconds, depth_size=(160, 120))
    video = make_video(out / VIDEO, frames=int(seconds * 30))
    return {"realsense": rec.path, "opencv": video}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="folder to write the recording and the video into")
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    for kind, path in make_all(args.out, args.seconds).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
