"""Concurrent jobs on one cache folder compute each statistic once."""

import multiprocessing as mp
import time
from pathlib import Path

import torch

from lrc.stats.cache import StatisticsCache
from lrc.stats.types import InputStatistics


def _job(root: str, marker: str, barrier, out) -> None:
    def compute(missing):
        with open(marker, "a") as fh:  # one line per computation
            fh.write("computed\n")
        time.sleep(1.5)  # long enough for the other job to arrive while this one computes
        return {"g": InputStatistics(tokens=7, gram=torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64))}

    barrier.wait()  # both jobs start at the same moment, on an empty cache
    stats, cached = StatisticsCache(Path(root)).get_or_compute({"model": "m"}, frozenset({"gram"}), compute)
    out.put((stats["g"].gram.tolist(), sorted(cached)))


def test_two_jobs_at_once_compute_statistics_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    marker = tmp_path / "computations.txt"
    jobs = [ctx.Process(target=_job, args=(str(tmp_path / "cache"), str(marker), barrier, out)) for _ in range(2)]
    for job in jobs:
        job.start()
    results = [out.get(timeout=120) for _ in jobs]
    for job in jobs:
        job.join(timeout=60)
        assert job.exitcode == 0
    assert marker.read_text().count("computed") == 1
    grams = [r[0] for r in results]
    assert grams[0] == grams[1] == [[2.0, 1.0], [1.0, 3.0]]
    assert sorted(r[1] for r in results) == [[], ["gram"]]  # one computed it, the other loaded it


def _killed_holder(root: str, started: str) -> None:
    """Takes the statistics lock and computes until it is killed (SIGKILL) from outside."""

    def compute(missing):
        Path(started).write_text("computing")
        time.sleep(60)  # killed long before this ends
        return {}

    StatisticsCache(Path(root)).get_or_compute({"model": "m"}, frozenset({"gram"}), compute)


def test_a_lock_holder_killed_mid_computation_neither_blocks_nor_leaves_a_partial_file(tmp_path):
    """SIGKILL while holding the statistics lock: the OS drops the lock, the next job computes the
    statistics itself (no deadlock) and never reads a half-written file."""
    import os
    import signal

    ctx = mp.get_context("spawn")
    started = tmp_path / "started"
    holder = ctx.Process(target=_killed_holder, args=(str(tmp_path / "cache"), str(started)))
    holder.start()
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "the lock holder never started computing"
    os.kill(holder.pid, signal.SIGKILL)  # mid-computation, the lock held, a temporary file possibly begun
    holder.join(timeout=30)
    assert holder.exitcode == -signal.SIGKILL

    def compute(missing):
        return {"g": InputStatistics(tokens=7, gram=torch.eye(2, dtype=torch.float64))}

    start = time.monotonic()
    stats, cached = StatisticsCache(tmp_path / "cache").get_or_compute({"model": "m"}, frozenset({"gram"}), compute)
    assert time.monotonic() - start < 10  # the dead holder's lock did not hold us up
    assert cached == frozenset() and stats["g"].gram.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    again, cached = StatisticsCache(tmp_path / "cache").get_or_compute({"model": "m"}, frozenset({"gram"}), compute)
    assert cached == frozenset({"gram"}) and again["g"].gram.tolist() == [[1.0, 0.0], [0.0, 1.0]]
