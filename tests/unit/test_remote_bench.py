"""`armada bench remote`'s measurements that need no processes: CURVE and JPEG costs, the table."""

from __future__ import annotations

import pytest

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


def test_delay_ms_defaults_to_5_and_refuses_nonsense():
    from armada.runtime.remote.bench import link_delay_ms

    assert link_delay_ms(None) == 5.0 and link_delay_ms(0) == 0.0 and link_delay_ms(12.5) == 12.5
    for bad in (-1.0, float("nan"), 1e6):
        with pytest.raises(ValueError, match="--delay-ms"):
            link_delay_ms(bad)


@pytest.mark.parametrize("argv, expect_s", [([], 0.005), (["--delay-ms", "12"], 0.012), (["--delay-ms", "0"], 0.0)])
def test_delay_ms_on_the_command_line_reaches_the_proxy(monkeypatch, capsys, argv, expect_s):
    from armada.runtime import cli
    from armada.runtime.remote import bench

    seen: list[tuple[bool, float]] = []

    def fake_setup(root, remote, seconds, delay_s):  # stands in for the processes, records what reached it
        seen.append((remote, delay_s))
        return {"setup": "remote" if remote else "local", "outcome": "completed", "frame_age_p50_ms": 1.0,
                "frame_age_p99_ms": 1.0, "chunk_latency_p50_ms": 1.0, "chunk_latency_p99_ms": 1.0, "chunks": 1,
                "driver_rtt_p50_ms": 1.0}

    monkeypatch.setattr(bench, "run_setup", fake_setup)
    monkeypatch.setattr(bench, "loopback_aliases", lambda: True)
    monkeypatch.setattr(bench, "curve_cpu", lambda: curve_cpu(megabytes=1))
    monkeypatch.setattr(bench, "jpeg_cost", lambda: jpeg_cost(reps=1))
    assert cli.main(["bench", "remote", "--seconds", "1", *argv]) == 0
    assert seen == [(False, 0.0), (True, pytest.approx(expect_s))]
    assert f"+{expect_s * 1000:.1f} ms each way" in capsys.readouterr().out


def test_a_negative_delay_is_refused_before_anything_runs(monkeypatch, capsys):
    from armada.runtime import cli
    from armada.runtime.remote import bench

    monkeypatch.setattr(bench, "run_setup", lambda *a: pytest.fail("ran a setup"))
    assert cli.main(["bench", "remote", "--delay-ms", "-3"]) == 2
    assert "--delay-ms -3" in capsys.readouterr().err
