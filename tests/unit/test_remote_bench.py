"""`armada bench remote`'s measurements that need no processes: CURVE and JPEG costs, the table."""

from __future__ import annotations

from armada.runtime.remote.bench import curve_cpu, format_table, jpeg_cost


def test_curve_costs_more_cpu_than_plain_tcp():
    r = curve_cpu(megabytes=16)
    assert r["plain_cpu_ms_per_mib"] > 0 and r["curve_cpu_ms_per_mib"] > 0
    # Encrypting and decrypting every byte cannot be free; a loaded host blurs small differences.
    assert r["curve_cpu_ms_per_mib"] > r["plain_cpu_ms_per_mib"] * 0.9, r


def test_jpeg_is_smaller_than_raw_and_costs_milliseconds():
    r = jpeg_cost(reps=3)
    assert r["raw_bytes_per_frame"] == 640 * 480 * 3
    assert 0 < r["jpeg_bytes_per_frame"] < r["raw_bytes_per_frame"] / 4
    assert r["encode_ms"] > 0 and r["decode_ms"] > 0


def test_table_names_every_setup_and_a_skip():
    episode = {"setup": "local", "outcome": "completed", "frame_age_p50_ms": 2.0, "frame_age_p99_ms": 5.0,
               "chunk_latency_p50_ms": 35.0, "chunk_latency_p99_ms": 40.0, "chunks": 12,
               "driver_rtt_p50_ms": 1.0}
    r = {"host": "h", "cpus": 2, "load_1m": 1.0, "link_delay_ms_one_way": 5.0, "episodes": [episode],
         "remote_skipped": "no aliases", "curve": curve_cpu(megabytes=2), "jpeg": jpeg_cost(reps=1)}
    text = format_table(r)
    assert "local" in text and "37.5" in text and "remote   skipped: no aliases" in text and "Mbit/s" in text
