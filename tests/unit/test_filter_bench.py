"""`armada bench filter` prints the filter's cost; here only that it measures what it says."""

from __future__ import annotations

from armada.drivers.core.filter_bench import bench_filter, print_table


def test_the_filter_bench_times_inner_and_guarded_filters_and_a_slow_stream_is_never_refused(capsys):
    results = bench_filter(1.0, ("ur3", "arx_lift2"))
    assert set(results) == {"ur3/slow", "ur3/fast", "arx_lift2/slow", "arx_lift2/fast"}
    for key, r in results.items():
        assert r["guarded"], key  # both describe their kinematics: the guard is in the stack
        assert r["ticks"] == int(r["rate_hz"])
        assert 0 < r["inner_us"]["p50"] and 0 < r["guarded_us"]["p50"]
    # A tenth of the range around home stays inside the boxes: a refusal there is a wrong box.
    assert results["ur3/slow"]["refused"] == 0 and results["arx_lift2/slow"]["refused"] == 0
    print_table(results)
    assert "ur3/fast" in capsys.readouterr().out
