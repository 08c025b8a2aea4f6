"""Cameras: RealSense (pyrealsense2), OpenCV/V4L2 and synthetic sources behind one camera process.

``source`` (the interface), ``registry`` (camera kinds are plugins, ``armada.cameras``), ``plugins``
(the shipped kinds' config models), ``factory`` (a lookup), ``realsense``, ``opencv_camera``, ``synthetic``,
``timing`` (clock mapping, drop counting), ``process`` (publish, recover), ``fake`` (a RealSense
recording and an MJPG video made at test time), ``bench`` (`armada bench cameras`).
"""
