"""Camera processes: synthetic now; RealSense and OpenCV/V4L2 plug in beside it."""
