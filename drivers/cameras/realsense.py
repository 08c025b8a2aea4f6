"""Intel RealSense through pyrealsense2: colour, optional depth aligned to colour, by serial.

Clock mapping (every frame's ``capture_ns`` is on the host wall clock):

- ``global_time`` domain (the default on D400 cameras once ``global_time_enabled`` is set):
  librealsense already maps the camera's hardware clock to the host system clock with its own
  running fit, so the frame timestamp (ms) *is* host wall-clock time of the exposure. It is
  used as is when it lies within 1 s of the arrival time (clock = ``rs:global_time``).
- ``hardware_clock`` domain (global time off or unsupported, and recordings): the device's own
  microsecond counter. Mapped with ``ClockMapper``: offset = sliding minimum of
  (host arrival - device time), so transport delay and scheduling noise do not bias it; the
  mapped time lags the exposure by the minimum transport delay (clock = ``rs:hardware_clock+min-offset``).
- ``system_time`` domain (no frame metadata, e.g. without the kernel patch): the host time
  at which librealsense received the frame; used as is (``rs:system_time``): it is an arrival
  stamp, late by the transport delay.
- A global or system timestamp further than 1 s from arrival (a recording made earlier, a host
  clock step) is mapped like a hardware clock instead, so ages downstream stay truthful.

The device timestamp and its domain travel in the frame header too (``device_ts_ns``,
``device_domain``), with the device frame counter (``device_frame``), whose gaps are drops.

Every wait has a timeout (``wait_for_frames(timeout_ms)``); a device that is not connected
is reported at once with the serials that are (``pipeline.start`` would hang about 15 s).
Exposure options apply to the colour sensor and are checked against the sensor's range.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from armada.drivers.cameras.source import Captured, SourceError, resolve
from armada.drivers.cameras.timing import ClockMapper

if TYPE_CHECKING:
    from armada.drivers.cameras.plugins import RealSenseCameraConfig

log = logging.getLogger("armada.camera.realsense")

PLAUSIBLE_NS = 1_000_000_000  # a host-domain stamp further than this from arrival is not trusted


def import_rs() -> Any:
    try:
        import pyrealsense2 as rs
    except ImportError as exc:
        raise SourceError(f"pyrealsense2 does not import ({exc}): `pip install pyrealsense2` and, on Debian/Ubuntu, "
                          "`apt-get install libusb-1.0-0`") from None
    return rs


def connected_serials(rs: Any) -> list[str]:
    return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]


class RealSenseSource:
    def __init__(self, cfg: "RealSenseCameraConfig", base_dir: Path | None = None):
        self.cfg = cfg
        self.base_dir = base_dir
        self.rs: Any = None
        self.pipeline: Any = None
        self.align: Any = None
        self.depth_scale_m: float | None = None
        self.mapper = ClockMapper(window=max(30, int(10 * cfg.fps)))
        self._last_number: int | None = None

    # ------------------------------------------------------------------ open / close

    def open(self) -> dict[str, Any]:
        self.rs = rs = import_rs()
        config = rs.config()
        where = self._select(rs, config)
        self._enable_streams(rs, config)
        pipeline = rs.pipeline()
        try:
            profile = pipeline.start(config)
        except RuntimeError as exc:
            raise SourceError(f"camera {self.cfg.name}: RealSense {where} does not stream "
                              f"{self._wanted()}: {exc}{self._recorded_streams(rs)}") from None
        self.pipeline = pipeline
        try:
            info = self._after_start(rs, profile, where)
        except Exception:
            self.close()
            raise
        self.mapper.reset()
        self._last_number = None
        return info

    def _select(self, rs: Any, config: Any) -> str:
        cfg = self.cfg
        if cfg.playback is not None:
            path = resolve(cfg.playback, self.base_dir)
            if not path.is_file():
                raise SourceError(f"camera {cfg.name}: recording {path} does not exist (playback, from the cell's "
                                  f"`playback` key; make one with `python -m armada.drivers.cameras.fake DIR`)")
            config.enable_device_from_file(str(path), repeat_playback=cfg.repeat_playback)
            return f"recording {path}"
        serials = connected_serials(rs)
        if cfg.serial is None:
            if len(serials) != 1:
                raise SourceError(f"camera {cfg.name}: {len(serials)} RealSense cameras connected "
                                  f"(serials {serials}); set `serial` to pick one")
            serial = serials[0]
        elif cfg.serial not in serials:
            raise SourceError(f"camera {cfg.name}: no RealSense with serial {cfg.serial!r} is connected; connected: "
                              f"{serials or 'none'} (check the USB 3 cable and `rs-enumerate-devices`)")
        else:
            serial = cfg.serial
        config.enable_device(serial)
        return f"serial {serial}"

    def _wanted(self) -> str:
        cfg = self.cfg
        out = f"colour {cfg.width}x{cfg.height} RGB8 at {cfg.fps:g} fps"
        if cfg.depth:
            dw, dh = self._depth_size()
            out += f" and depth {dw}x{dh} Z16"
        return out

    def _depth_size(self) -> tuple[int, int]:
        cfg = self.cfg
        return (cfg.depth_width or cfg.width, cfg.depth_height or cfg.height)

    def _enable_streams(self, rs: Any, config: Any) -> None:
        cfg = self.cfg
        fps = int(round(cfg.fps))
        config.enable_stream(rs.stream.color, cfg.width, cfg.height, rs.format.rgb8, fps)
        if cfg.depth:
            dw, dh = self._depth_size()
            config.enable_stream(rs.stream.depth, dw, dh, rs.format.z16, fps)

    def _recorded_streams(self, rs: Any) -> str:
        """For a recording that does not hold what the config asks: what it does hold."""
        if self.cfg.playback is None:
            return ""
        try:
            device = rs.context().load_device(str(resolve(self.cfg.playback, self.base_dir)))
            profiles = [str(p) for s in device.query_sensors() for p in s.get_stream_profiles()]
        except RuntimeError:
            return ""
        return f"; the recording holds {profiles}"

    def _after_start(self, rs: Any, profile: Any, where: str) -> dict[str, Any]:
        device = profile.get_device()
        serial = device.get_info(rs.camera_info.serial_number)
        playback = self.cfg.playback is not None
        if playback and self.cfg.serial is not None and serial != self.cfg.serial:
            raise SourceError(f"camera {self.cfg.name}: {where} was made by serial {serial!r}, "
                              f"the config asks for {self.cfg.serial!r}")
        if playback:
            log.info("camera %s: playing %s; exposure options are the recording's", self.cfg.name, where)
        else:
            self._configure_sensors(rs, device)
        self.align = rs.align(rs.stream.color) if self.cfg.depth else None
        if self.cfg.depth:
            self.depth_scale_m = float(device.first_depth_sensor().get_depth_scale())
        k = profile.get_stream(rs.stream.color).as_video_stream_profile().get_intrinsics()
        return {"source": "realsense", "device": where, "serial": serial, "streams": self._wanted(),
                "playback": playback, "depth_scale_m": self.depth_scale_m,
                "colour_intrinsics": {"fx": k.fx, "fy": k.fy, "ppx": k.ppx, "ppy": k.ppy, "model": str(k.model),
                                      "coeffs": list(k.coeffs)}}

    def _configure_sensors(self, rs: Any, device: Any) -> None:
        cfg = self.cfg
        for sensor in device.query_sensors():
            if sensor.supports(rs.option.global_time_enabled):
                sensor.set_option(rs.option.global_time_enabled, 1.0 if cfg.global_time else 0.0)
        colour = device.first_color_sensor()
        settings = [(rs.option.enable_auto_exposure, 1.0 if cfg.auto_exposure else 0.0, "auto_exposure")]
        if cfg.exposure_us is not None:
            settings.append((rs.option.exposure, cfg.exposure_us, "exposure_us"))
        if cfg.gain is not None:
            settings.append((rs.option.gain, cfg.gain, "gain"))
        for option, value, key in settings:
            self._set_option(colour, option, value, key)

    def _set_option(self, sensor: Any, option: Any, value: float, key: str) -> None:
        if not sensor.supports(option):
            raise SourceError(f"camera {self.cfg.name}: the colour sensor has no {option} (config key `{key}`)")
        r = sensor.get_option_range(option)
        if not r.min <= value <= r.max:
            raise SourceError(f"camera {self.cfg.name}: `{key}` {value:g} is outside the sensor's range "
                              f"[{r.min:g}, {r.max:g}]")
        sensor.set_option(option, value)

    def close(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is None:
            return
        try:
            pipeline.stop()
        except RuntimeError as exc:  # an unplugged device: nothing left to stop
            log.warning("camera %s: stopping the pipeline: %s", self.cfg.name, exc)

    # ------------------------------------------------------------------ frames

    def read(self, timeout_s: float) -> Captured | None:
        if self.pipeline is None:
            return None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            frames = self._next_frames(remaining_ms)
            if frames is None:
                return None
            captured = self._captured(frames, time.time_ns())
            if captured is not None:
                return captured
            if remaining_ms <= 0:
                return None

    def _next_frames(self, timeout_ms: int) -> Any:
        """A frameset within the timeout (0: only one already waiting), or None."""
        try:
            if timeout_ms <= 0:
                frames = self.pipeline.poll_for_frames()
                return frames if frames else None
            return self.pipeline.wait_for_frames(timeout_ms)
        except RuntimeError:  # "Frame didn't arrive within ..." (or the device is gone)
            return None

    def _captured(self, frames: Any, arrival_ns: int) -> Captured | None:
        colour = frames.get_color_frame()
        if not colour:
            return None
        number = int(colour.get_frame_number())
        if number == self._last_number:
            return None  # the syncer re-sent this colour frame with a newer depth frame
        depth, depth_number = None, None
        if self.align is not None:
            aligned = self.align.process(frames)
            depth_frame = aligned.get_depth_frame()
            if not depth_frame:
                return None  # colour without its depth: wait for a pair
            depth = np.array(depth_frame.get_data(), copy=True)  # release librealsense's buffer now
            depth_number = int(depth_frame.get_frame_number())
        self._last_number = number
        rgb = np.array(colour.get_data(), copy=True)
        capture_ns, clock, device_ns, domain = self._host_time(colour, arrival_ns)
        return Captured(rgb, capture_ns, clock, device_frame=number, device_ts_ns=device_ns, device_domain=domain,
                        depth=depth, depth_scale_m=self.depth_scale_m, depth_frame=depth_number)

    def _host_time(self, frame: Any, arrival_ns: int) -> tuple[int, str, int, str]:
        rs = self.rs
        domain = frame.get_frame_timestamp_domain()
        device_ns = int(round(frame.get_timestamp() * 1e6))
        name = domain.name
        host_domain = domain in (rs.timestamp_domain.global_time, rs.timestamp_domain.system_time)
        if host_domain and abs(arrival_ns - device_ns) < PLAUSIBLE_NS:
            return device_ns, f"rs:{name}", device_ns, name
        return self.mapper.map(device_ns, arrival_ns), f"rs:{name}+min-offset", device_ns, name
