"""Peak memory of the host process and of the accelerator, per stage of a run."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_host_bytes() -> int:
    """The process's peak resident memory (since start, or since :func:`reset_peak_host`)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; never reset


def reset_peak_host() -> bool:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs); False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


def reset_peak_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class Usage:
    """What a run used: seconds per stage and peak bytes per stage (see :class:`Stopwatch`)."""

    timings: dict[str, float]
    memory: dict[str, int]


class Stopwatch:
    """Seconds per stage (``watch("calibration_s")`` laps add up) and each stage's peak host
    and device memory (bytes, under ``memory["<stage>_peak_host"]`` / ``_peak_device``).

    ``memory["host_peak_per_stage"]`` is 1 when every host peak was measured within its stage
    (the peak was reset at the stage's start), 0 when a reset failed and some stage's value is
    the process's peak since it started."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.memory: dict[str, int] = {"host_peak_per_stage": 1}
        self.device = device

    def __call__(self, key: str):
        watch = self
        stage = key.removesuffix("_s")

        class _Lap:
            def __enter__(self):
                if not reset_peak_host():
                    watch.memory["host_peak_per_stage"] = 0
                if watch.device is not None:
                    reset_peak_device(watch.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                watch.timings[key] = watch.timings.get(key, 0.0) + time.perf_counter() - self.start
                watch._peak(f"{stage}_peak_host", peak_host_bytes())
                if watch.device is not None and (dev := peak_device_bytes(watch.device)) is not None:
                    watch._peak(f"{stage}_peak_device", dev)

        return _Lap()

    def _peak(self, key: str, value: int) -> None:
        self.memory[key] = max(self.memory.get(key, 0), value)

    def usage(self) -> Usage:
        return Usage(dict(self.timings), dict(self.memory))
