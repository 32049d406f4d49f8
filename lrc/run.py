"""Hydra entry point: ``python -m lrc.run [overrides]`` / ``python -m lrc.run -m a=1,2 b=x,y``.

The only module that sees the DictConfig: it builds plain objects from the config groups,
calls :func:`lrc.pipeline.compress_and_evaluate` and writes ``result.json`` atomically into
the run's Hydra output directory. Bad input ends in one clear line (exit code 2); in a
multirun a failed job is recorded (status "failed") and the sweep goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lrc.allocators.base import Allocator
from lrc.allocators.keep_dense import KeepDense
from lrc.budget import check_ratio
from lrc.compress.layerwise import LayerwiseOptions
from lrc.data.windows import Calibration
from lrc.errors import ConfigError, LrcError
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.eval.zeroshot import ZeroShotBenchmark
from lrc.model.checkpoint import save_compressed
from lrc.model.loading import resolve_device
from lrc.paths import cache_root
from lrc.results.records import RESULT_FILE, read_record, versions, write_record, write_trials

log = logging.getLogger("lrc")
CHECKPOINT_DIR = "model"  # save=true writes the compressed model here, inside the run folder


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with a one-line error naming the config group and the bad option.

    A ``name`` key labels the choice for records and reports and is not passed on.
    """
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    spec.pop("name", None)
    try:
        built = instantiate(spec, _convert_="all")
        return built(**kwargs) if kwargs else built
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, LrcError):
            raise cause from None
        detail = str(cause) if cause is not None else str(exc).splitlines()[-1]
        raise ConfigError(f"{what}: {detail.strip()}") from None
    except TypeError as exc:  # a partial called with options it does not take
        raise ConfigError(f"{what}: {exc}") from None


def build_benchmarks(cfg: DictConfig) -> list[PerplexityBenchmark | ZeroShotBenchmark]:
    benches: list[PerplexityBenchmark | ZeroShotBenchmark] = []
    for name, node in (cfg.benchmark.get("perplexity") or {}).items():
        opts = OmegaConf.to_container(node, resolve=True)
        source = build(node.source, f"benchmark.perplexity.{name}.source")
        opts.pop("source")
        try:
            benches.append(PerplexityBenchmark(name=name, source=source, **opts))
        except TypeError as exc:
            raise ConfigError(f"benchmark.perplexity.{name}: {exc}") from None
    zeroshot = cfg.benchmark.get("zeroshot")
    if zeroshot:
        try:
            bench = ZeroShotBenchmark(**OmegaConf.to_container(zeroshot, resolve=True))
        except TypeError as exc:
            raise ConfigError(f"benchmark.zeroshot: {exc}") from None
        bench.check()  # unknown task names fail here, before the model is loaded
        benches.append(bench)
    if not benches:
        raise ConfigError(f"benchmark={cfg.benchmark.get('name')!r} defines no benchmark")
    return benches


def layerwise_options(cfg: DictConfig) -> LayerwiseOptions:
    spec = OmegaConf.to_container(cfg.get("layerwise") or {}, resolve=True)
    known = {f.name for f in fields(LayerwiseOptions)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"layerwise: unknown option(s) {unknown}; known: {sorted(known)}")
    for key, value in spec.items():
        if not isinstance(value, bool):
            raise ConfigError(f"layerwise.{key}={value!r} must be true or false")
    return LayerwiseOptions(**spec)


def build_allocator(node: DictConfig) -> Allocator:
    """The allocator of ``node``; a non-empty ``keep_dense`` wraps it in :class:`KeepDense`."""
    spec = OmegaConf.to_container(node, resolve=True)
    keep = spec.pop("keep_dense", None) or []
    what = f"allocator={spec.get('name')}"
    if not isinstance(keep, list):
        raise ConfigError(f"{what}: keep_dense={keep!r} must be a list of projection names, e.g. [v_proj]")
    allocator = build(spec, what)
    return KeepDense(allocator, keep) if keep else allocator


def build_calibration(cfg: DictConfig) -> Calibration:
    node = cfg.calibration
    source = build(node.source, "calibration.source")
    opts = {k: node[k] for k in ("nsamples", "seqlen", "seed", "sampling", "batch_size") if k in node}
    validation = build(node.validation, "calibration.validation") if node.get("validation") else None
    return Calibration(source=source, validation=validation, **opts)  # validates its options


def environment() -> dict[str, str]:
    """Where the run ran: host, device and the scheduler's job (SLURM) variables."""
    keys = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION")
    return {"host": socket.gethostname(), **{k: os.environ[k] for k in keys if k in os.environ}}


def sweep_group() -> str | None:
    """The sweep's output folder (e.g. ``multirun/2026-11-23/13-00-00``) in a multirun, else None."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    return str(sweep.relative_to("outputs") if sweep.parts[:1] == ("outputs",) else sweep)


OmegaConf.register_new_resolver("lrc_sweep_group", sweep_group, replace=True)  # conf/logger/wandb.yaml


def job_dirname(overrides: str, limit: int = 200) -> str:
    """A sweep job's folder name from its overrides: one path component whatever the values
    (``/`` becomes ``_``), shortened with a hash suffix when too long for a file name."""
    name = overrides.replace(os.sep, "_").replace("\0", "") or "run"
    if len(name.encode()) > limit:
        digest = hashlib.sha256(overrides.encode()).hexdigest()[:12]
        name = name.encode()[: limit - 13].decode(errors="ignore") + "-" + digest
    return name


OmegaConf.register_new_resolver("lrc_job_dirname", job_dirname, replace=True)  # conf/config.yaml hydra.sweep.subdir


@dataclass
class Job:
    """Everything a config builds, ready for :func:`lrc.pipeline.compress_and_evaluate`."""

    ratio: float
    factorizer: Any
    allocator: Any
    calibration: Calibration
    benchmarks: list[Any]
    layerwise: LayerwiseOptions
    device: Any

    def load(self, cfg: DictConfig) -> tuple[Any, float]:
        """The model (on the host in layer-wise mode, which moves one block at a time to the
        device) and the seconds loading took."""
        t0 = time.perf_counter()
        load_on = {"device": "cpu"} if self.layerwise.enabled else {}
        loaded = build(OmegaConf.merge(cfg.model.load, load_on), f"model={cfg.model.get('name')}")
        load_s = time.perf_counter() - t0
        log.info("loaded %s (%s) on %s in %.1fs", cfg.model.get("name"), type(loaded.model).__name__,
                 loaded.device, load_s)
        return loaded, load_s

    def compress(self, loaded: Any, cfg: DictConfig, tracker: Any = None, benchmarks: bool = True) -> Any:
        from lrc.pipeline import compress_and_evaluate

        return compress_and_evaluate(loaded, self.factorizer, self.allocator, self.ratio, self.calibration,
                                     self.benchmarks if benchmarks else [], cache_dir=cache_root(cfg.cache_dir),
                                     tracker=tracker, measure_forward=cfg.measure_forward and benchmarks,
                                     layerwise=self.layerwise, device=self.device)


def prepare(cfg: DictConfig) -> Job:
    """Validate and build every part of the config (bad input fails here, before any heavy work)."""
    return Job(ratio=check_ratio(cfg.ratio),
               factorizer=build(cfg.factorizer, f"factorizer={cfg.get('factorizer', {}).get('name')}"),
               allocator=build_allocator(cfg.allocator),
               calibration=build_calibration(cfg), benchmarks=build_benchmarks(cfg),
               layerwise=layerwise_options(cfg), device=resolve_device(cfg.device))


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Validate, build, compress, evaluate; return the record (also written to result.json)."""
    start = time.perf_counter()
    job = prepare(cfg)
    ratio = job.ratio
    config = OmegaConf.to_container(cfg, resolve=True)
    loaded, load_s = job.load(cfg)

    tracker = build(cfg.logger, "logger", output_dir=output_dir, config=config)
    with tracker:
        outcome = job.compress(loaded, cfg, tracker)
        timings = {"load_s": load_s, **outcome.timings}
        for key in ("calibration_s", "allocation_s", "factorization_s", "benchmark_s"):
            timings.setdefault(key, 0.0)
        timings["total_s"] = time.perf_counter() - start
        record = {"status": "done", "config": config, "ranks": outcome.ranks, "params": outcome.params,
                  "metrics": outcome.metrics, "dense_metrics": outcome.dense_metrics, "timings": timings,
                  "memory": outcome.memory,
                  "versions": versions(), "diagnostics": outcome.diagnostics, "environment": environment()}
        if outcome.trials:
            record["trials"] = outcome.trials
            log.info("trials: %s", write_trials(output_dir, outcome.trials))
        if cfg.get("save"):
            record["checkpoint"] = str(output_dir / CHECKPOINT_DIR)
            save_compressed(loaded.model, loaded.tokenizer, output_dir / CHECKPOINT_DIR, record=record,
                            merge=bool(cfg.get("merge")))
            log.info("compressed model saved to %s%s", output_dir / CHECKPOINT_DIR,
                     " (factors merged into dense weights)" if cfg.get("merge") else "")
        path = write_record(output_dir, record)
    for metric, value in outcome.metrics.items():
        log.info("%s: dense %.4g -> compressed %.4g (x%.2f) at ratio %.2f", metric, outcome.dense_metrics[metric],
                 value, value / outcome.dense_metrics[metric], ratio)
    log.info("result: %s", path)
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
    if {**record.get("config", {}), "force": None} != {**current, "force": None}:
        log.info("%s holds a result for another config; recomputing", path)
        return None
    return record


class Cancelled(LrcError):
    """The job was told to stop (scancel, preemption, a time limit): SIGTERM."""


def _cancelled(signum: int, frame: Any) -> None:
    raise Cancelled(f"cancelled by {signal.Signals(signum).name} (scancel, preemption or a time limit)")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if threading.current_thread() is threading.main_thread():
        # SLURM sends SIGTERM before killing a job: record it as failed (a re-run redoes it)
        signal.signal(signal.SIGTERM, _cancelled)
    done = finished_record(cfg, output_dir)
    if done is not None:  # a re-run sweep skips what it already finished (force=true recomputes)
        log.info("already done, skipped (force=true recomputes): %s", output_dir / RESULT_FILE)
        return next(iter(done["metrics"].values()), None)
    try:
        record = run(cfg, output_dir)
    except LrcError as exc:
        write_record(output_dir, {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                  "config": OmegaConf.to_container(cfg, resolve=False)})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("run failed: %s", exc)
            return None
        print(f"lrc: error: {exc}", file=sys.stderr)
        sys.exit(2)
    first = next(iter(record["metrics"].values()), None)
    return first


if __name__ == "__main__":
    main()
