"""Camera fakes built at test time and played through the real libraries.

- ``realsense_recording.make_recording``: a synthetic RealSense recording (colour + depth, known
  frame numbers and hardware timestamps) written by librealsense's own recorder from a
  ``software_device``; played back through the real ``rs.pipeline``.
- ``video_file.make_video``: an MJPG .avi with the frame number drawn in, opened through the
  real ``cv2.VideoCapture`` by the same code path as a V4L2 device.

``python -m armada.drivers.cameras.fake OUT_DIR`` writes both (what configs/cells/cameras_fake.yaml plays).
"""
