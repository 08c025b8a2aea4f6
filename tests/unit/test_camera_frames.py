"""Camera frames on the wire: JPEG encoded by the publisher, depth as a third part, lazy decoding."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from armada.runtime import protocol
from armada.runtime.transport import FramePublisher, FrameSubscriber

cv2 = pytest.importorskip("cv2")

H, W = 240, 320


def _image(seed: int = 0) -> np.ndarray:
    """A smooth RGB image with distinct channels (a red/blue swap would show)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    img = np.stack([x / W * 255, y / H * 255, np.full_like(x, 60 + seed)], axis=-1)
    return np.ascontiguousarray(img.astype(np.uint8))


def _pair(ctx, short_tmp) -> tuple[FramePublisher, FrameSubscriber]:
    endpoint = f"ipc://{short_tmp}/cam"
    pub, sub = FramePublisher(ctx, endpoint), FrameSubscriber(ctx, endpoint, hwm=100)
    probe = np.zeros((2, 2, 3), np.uint8)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        pub.send(probe, camera="probe", frame_seq=0, capture_ns=1)
        if sub.recv(0.02) is not None:
            time.sleep(0.02)
            while sub.recv(0) is not None:
                pass
            return pub, sub
    raise AssertionError("frame subscriber never connected")


def test_publisher_jpeg_is_decoded_transparently_and_says_what_it_cost(ctx, short_tmp):
    pub, sub = _pair(ctx, short_tmp)
    rgb = _image()
    sent = pub.send(rgb, jpeg_quality=90, camera="front", frame_seq=7, capture_ns=123)
    frame = sub.recv(1.0)
    assert frame is not None, sub.counters.last_error
    h = frame.header
    assert (h["encoding"], h["jpeg_quality"], h["frame_seq"]) == ("jpeg", 90, 7)
    assert (h["width"], h["height"], h["channels"], h["dtype"]) == (W, H, 3, "uint8")
    assert h["encode_us"] > 0 and frame.decode_us > 0
    assert frame.wire_bytes == sent < rgb.nbytes / 5
    assert frame.pixels.shape == rgb.shape and not frame.pixels.flags.writeable
    err = np.abs(frame.pixels.astype(np.int16) - rgb)
    assert all(err[..., c].mean() < 3 for c in range(3))


def test_raw_colour_and_depth_arrive_without_a_copy(ctx):
    pub, sub = FramePublisher(ctx, "inproc://cam"), FrameSubscriber(ctx, "inproc://cam")
    time.sleep(0.05)
    rgb = _image()
    depth = (np.arange(H * W, dtype=np.uint16) % 5000).reshape(H, W)
    pub.send(rgb, depth=depth, depth_scale_m=0.001, camera="head", frame_seq=1, capture_ns=5)
    frame = sub.recv(1.0)
    assert frame is not None, sub.counters.last_error
    assert frame.header["depth_dtype"] == "uint16" and frame.header["depth_scale_m"] == 0.001
    assert np.array_equal(frame.pixels, rgb) and np.array_equal(frame.depth, depth)
    # Over inproc the received arrays are the sender's buffers: nothing was copied on the way.
    assert np.shares_memory(frame.depth, depth) and np.shares_memory(frame.pixels, rgb)
    assert not frame.depth.flags.writeable
    assert frame.wire_bytes == rgb.nbytes + depth.nbytes


def test_depth_stays_raw_when_colour_goes_as_jpeg(ctx, short_tmp):
    pub, sub = _pair(ctx, short_tmp)
    depth = np.full((H, W), 812, np.uint16)
    pub.send(_image(), jpeg_quality=80, depth=depth, depth_scale_m=0.001, camera="head", frame_seq=1, capture_ns=5)
    frame = sub.recv(1.0)
    assert frame is not None, sub.counters.last_error
    assert frame.header["encoding"] == "jpeg"
    assert np.array_equal(frame.depth, depth)  # bit-exact: JPEG would have smeared it


def test_depth_that_is_not_aligned_to_colour_is_refused_by_the_publisher(ctx, short_tmp):
    pub, _ = _pair(ctx, short_tmp)
    with pytest.raises(ValueError, match="aligned"):
        pub.send(_image(), depth=np.zeros((H // 2, W // 2), np.uint16), camera="head", frame_seq=1, capture_ns=5)


@pytest.mark.parametrize("parts, code", [
    ("depth part without depth_dtype", "bad_encoding"),
    ("depth_dtype without a depth part", "bad_encoding"),
    ("depth part of the wrong size", "bad_shape"),
    ("depth dtype not allowed", "bad_type"),
])
def test_malformed_depth_frames_are_rejected_and_counted(ctx, short_tmp, parts, code):
    pub, sub = _pair(ctx, short_tmp)
    header = {"camera": "head", "frame_seq": 1, "capture_ns": 5, "width": W, "height": H, "channels": 3,
              "dtype": "uint8", "encoding": "raw", "depth_dtype": "uint16", "depth_scale_m": 0.001}
    rgb, depth = _image().tobytes(), bytes(H * W * 2)
    if parts == "depth part without depth_dtype":
        del header["depth_dtype"]
        message = [rgb, depth]
    elif parts == "depth_dtype without a depth part":
        message = [rgb]
    elif parts == "depth part of the wrong size":
        message = [rgb, depth[:-2]]
    else:
        header["depth_dtype"] = "int64"
        message = [rgb, bytes(H * W * 8)]
    pub.socket.send_multipart([protocol.encode(pub.factory.make("frame", **header)), *message])
    assert sub.recv(1.0) is None
    assert sub.counters.by_code == {code: 1}


def test_newest_only_consumer_decodes_one_jpeg_not_every_queued_one(ctx, short_tmp):
    pub, sub = _pair(ctx, short_tmp)
    before = sub.counters.received
    header = pub.factory.make("frame", camera="c", frame_seq=1, capture_ns=5, width=W, height=H, channels=3,
                              dtype="uint8", encoding="jpeg")
    # An undecodable JPEG whose header is fine, then a good frame: the first is skipped unread.
    pub.socket.send_multipart([protocol.encode(header), b"\xff\xd8 not a jpeg"])
    pub.send(_image(), jpeg_quality=80, camera="c", frame_seq=2, capture_ns=6)
    pub.socket.send_multipart([b"\x00garbage", b"x"])  # a broken header is still counted
    time.sleep(0.1)
    frame = sub.recv_latest(1.0)
    assert frame is not None and frame.header["frame_seq"] == 2
    assert sub.counters.received - before == 3
    assert sub.counters.by_code == {"bad_encoding": 1}  # the garbage; the bad JPEG was never decoded


def test_a_newest_jpeg_that_fails_to_decode_falls_back_to_the_one_before(ctx, short_tmp):
    pub, sub = _pair(ctx, short_tmp)
    pub.send(_image(), jpeg_quality=80, camera="c", frame_seq=1, capture_ns=5)
    header = pub.factory.make("frame", camera="c", frame_seq=2, capture_ns=6, width=W, height=H, channels=3,
                              dtype="uint8", encoding="jpeg")
    pub.socket.send_multipart([protocol.encode(header), b"\xff\xd8 not a jpeg"])
    time.sleep(0.1)
    frame = sub.recv_latest(1.0)
    assert frame is not None and frame.header["frame_seq"] == 1
    assert sub.counters.by_code == {"bad_encoding": 1}


def test_zero_copy_is_kept_for_raw_frames_sent_over_ipc(ctx, short_tmp):
    pub, sub = _pair(ctx, short_tmp)
    pub.send(_image(), camera="c", frame_seq=3, capture_ns=7)
    frame = sub.recv(1.0)
    assert frame is not None and frame.header["encoding"] == "raw"
    base = frame.pixels
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, zmq.Frame)  # a view on ZeroMQ's buffer
