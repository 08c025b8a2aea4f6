"""The delaying TCP proxy (runtime/remote/proxy.py): delay, stall and cut do what they say."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from armada.runtime.remote.proxy import DelayProxy


@pytest.fixture()
def echo():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(0.1)
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                conn.sendall(data)
            conn.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield server.getsockname()
    stop.set()
    t.join(2)
    server.close()


def _round_trip(sock: socket.socket, payload: bytes = b"x" * 100, timeout_s: float = 5.0) -> float:
    t = time.monotonic()
    sock.sendall(payload)
    got = b""
    sock.settimeout(timeout_s)
    while len(got) < len(payload):
        got += sock.recv(65536)
    assert got == payload
    return time.monotonic() - t


def test_delay_is_added_each_way(echo):
    with DelayProxy("127.0.0.1", echo, delay_s=0.05) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            rtts = [_round_trip(s) for _ in range(5)]
    assert 0.1 <= min(rtts) < 0.3, rtts  # 2 x 50 ms, plus polling
    assert proxy.stats.bytes_up == proxy.stats.bytes_down == 500


def test_stall_holds_then_delivers_everything(echo):
    with DelayProxy("127.0.0.1", echo) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            _round_trip(s)
            proxy.stall(0.3)
            assert _round_trip(s) >= 0.25


def test_cut_is_silence_not_a_refusal_and_restore_delivers(echo):
    with DelayProxy("127.0.0.1", echo) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as s:
            _round_trip(s)
            proxy.cut()
            s.sendall(b"y" * 10)
            s.settimeout(0.3)
            with pytest.raises(socket.timeout):
                s.recv(10)  # nothing back, and the connection is not reset
            proxy.restore()
            s.settimeout(2)
            assert s.recv(10) == b"y" * 10


def test_bad_delay_refused(echo):
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", echo, delay_s=-1)
