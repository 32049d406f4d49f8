"""Hydra entry point: ``python -m lrc.run [overrides]`` / ``python -m lrc.run -m a=1,2 b=x,y``.

It builds the run's typed objects from the config (:mod:`lrc.config.build`), calls
:func:`lrc.pipeline.compress_and_evaluate`, logs the outcome to W&B in one place
(:func:`lrc.results.tracking.log_outcome`) and writes ``result.json`` atomically into
the run's Hydra output directory. Bad input ends in one clear line (exit code 2); in a
multirun a failed job is recorded (status "failed") and the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lrc.config.build import build, current_targets, load_model, run_spec
from lrc.errors import LrcError
from lrc.model.checkpoint import save_compressed
from lrc.paths import CHECKPOINT_DIR, RESULT_FILE
from lrc.pipeline import compress_and_evaluate
from lrc.results.outcome import Outcome
from lrc.results.records import TIMING_KEYS, read_record, versions, write_record, write_trials
from lrc.results.tracking import log_outcome

log = logging.getLogger("lrc")


def environment() -> dict[str, str]:
    """Where the run ran: host, device and the scheduler's job (SLURM) variables."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION")
    return {"host": socket.gethostname(), **{k: os.environ[k] for k in keys if k in os.environ}}










def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Validate, build, compress, evaluate; return the record (also written to result.json)."""
    start = time.perf_counter()
    spec = run_spec(cfg, run_dir=output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    loaded, load_s = load_model(cfg, spec)
    tracker = build(cfg.logger, "logger", output_dir=output_dir, config=config)
    with tracker:
        outcome = compress_and_evaluate(loaded, spec)
        log_outcome(tracker, outcome, spec.ratio)
        record = make_record(config, outcome, load_s, time.perf_counter() - start)
        if outcome.trials:
            log.info("trials: %s", write_trials(output_dir, outcome.trials))
        if cfg.get("save"):
            record["checkpoint"] = str(output_dir / CHECKPOINT_DIR)
            save_compressed(loaded.model, loaded.tokenizer, output_dir / CHECKPOINT_DIR, record=record,
                            merge=bool(cfg.get("merge")))
            log.info("compressed model saved to %s%s", output_dir / CHECKPOINT_DIR,
                     " (factors merged into dense weights)" if cfg.get("merge") else "")
        path = write_record(output_dir, record)
    for metric, value in outcome.metrics.items():
        dense = outcome.dense_metrics.get(metric)
        times = f" (x{value / dense:.2f})" if dense else ""  # chance levels and some stderrs are 0
        log.info("%s: dense %s -> compressed %.4g%s at ratio %.2f", metric,
                 "-" if dense is None else f"{dense:.4g}", value, times, spec.ratio)
    log.info("result: %s", path)
    return record


def make_record(config: dict[str, Any], outcome: Outcome, load_s: float, total_s: float) -> dict[str, Any]:
    """The finished run's record (schema: :mod:`lrc.results.records`)."""
    timings = {"load_s": load_s, **outcome.usage.timings, "total_s": total_s}
    for key in TIMING_KEYS:
        timings.setdefault(key, 0.0)
    record = {"status": "done", "config": config, "ranks": outcome.ranks, "params": outcome.params,
              "metrics": outcome.metrics, "dense_metrics": outcome.dense_metrics, "timings": timings,
              "memory": outcome.usage.memory, "versions": versions(), "diagnostics": outcome.diagnostics,
              "environment": environment()}
    if outcome.trials:
        record["trials"] = outcome.trials
    return record


def finished_record(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """The record already in ``output_dir`` when it is done and was made by this same config."""
    path = output_dir / RESULT_FILE
    if cfg.get("force") or not path.is_file():
        return None
    try:
        record = read_record(path)
    except (OSError, ValueError):
        return None
    if record.get("status") != "done":
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    if {**current_targets(record.get("config", {})), "force": None} != {**current, "force": None}:
        log.info("%s holds a result for another config; recomputing", path)
        return None
    return record


class Cancelled(LrcError):
    """The job was told to stop (scancel, preemption, a time limit): SIGTERM."""


class Signals:
    """SIGTERM ends a run as failed (a re-run redoes it) - unless submitit is requeueing it.

    Under submitit (``launcher=slurm``, ``max_num_timeout`` > 0) SLURM sends USR2 before a time
    limit or on preemption; submitit's handler requeues the job and exits, and SLURM's SIGTERM
    that follows must not record the run as failed: the requeued job carries on in the same
    folder (statistics, scored plans and dense metrics come back from the caches).
    """

    # After SIGTERM, Cancelled is raised again every REPEAT_S seconds until the run catches it:
    # the first raise can land in code that swallows exceptions (a Cython callback inside scipy
    # printed "Exception ignored" and the search went on until SLURM killed it, unrecorded).
    REPEAT_S = 0.5

    def __init__(self) -> None:
        self.requeueing = False
        self.submitit_usr2 = signal.getsignal(signal.SIGUSR2)
        self.cancelled: str | None = None

    def install(self) -> Signals:
        signal.signal(signal.SIGTERM, self.on_term)
        if callable(self.submitit_usr2):
            signal.signal(signal.SIGUSR2, self.on_usr2)
        return self

    def disarm(self) -> None:
        """Stop raising Cancelled again (the run has caught it and records it)."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    def on_usr2(self, signum: int, frame: Any) -> None:
        self.requeueing = True
        log.warning("%s: requeueing the job (preemption or time limit)", signal.Signals(signum).name)
        self.submitit_usr2(signum, frame)

    def on_term(self, signum: int, frame: Any) -> None:
        if self.requeueing:
            log.warning("SIGTERM while requeueing: the requeued job continues this run")
            return
        self.cancelled = f"cancelled by {signal.Signals(signum).name} (scancel, preemption or a time limit)"
        signal.signal(signal.SIGALRM, self.on_repeat)
        signal.setitimer(signal.ITIMER_REAL, self.REPEAT_S, self.REPEAT_S)
        raise Cancelled(self.cancelled)

    def on_repeat(self, signum: int, frame: Any) -> None:
        raise Cancelled(self.cancelled)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    signals = None
    if threading.current_thread() is threading.main_thread():
        # SLURM sends SIGTERM before killing a job: record it as failed (a re-run redoes it)
        signals = Signals().install()
    done = finished_record(cfg, output_dir)
    if done is not None:  # a re-run sweep skips what it already finished (force=true recomputes)
        log.info("already done, skipped (force=true recomputes): %s", output_dir / RESULT_FILE)
        return next(iter(done["metrics"].values()), None)
    try:
        record = run(cfg, output_dir)
    except LrcError as exc:
        if signals is not None:
            signals.disarm()
        try:
            write_record(output_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                      "config": OmegaConf.to_container(cfg, resolve=False)})
        except LrcError as unwritable:  # the failure may be that nothing can be written there
            log.error("%s", unwritable)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("run failed: %s", exc)
            return None
        print(f"lrc: error: {exc}", file=sys.stderr)
        sys.exit(2)
    first = next(iter(record["metrics"].values()), None)
    return first


if __name__ == "__main__":
    main()
