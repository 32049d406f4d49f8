"""Per-stage peak memory: honest about how it was measured."""

from lrc import resources
from lrc.resources import Stopwatch


def test_stage_peaks_say_whether_they_were_measured_per_stage(monkeypatch):
    watch = Stopwatch()
    with watch("a_s"):
        blob = bytearray(64 * 2**20)
    del blob
    assert watch.memory["a_peak_host"] > 0 and "a_s" in watch.timings
    per_stage = resources.reset_peak_host()  # True where /proc/self/clear_refs works (Linux)
    assert watch.memory["host_peak_per_stage"] == int(per_stage)

    monkeypatch.setattr(resources, "reset_peak_host", lambda: False)  # e.g. no /proc (macOS) or no permission
    fallback = Stopwatch()
    with fallback("b_s"):
        pass
    assert fallback.memory["host_peak_per_stage"] == 0  # b's peak is the process's peak since start
