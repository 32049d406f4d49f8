"""From a composed config to the plain typed objects of a run (:class:`lrc.pipeline.RunSpec`).

The one place besides the entry point that reads OmegaConf: every option is type-checked
against its target's signature (:mod:`lrc.config.schema`) and built with Hydra's
``instantiate``; bad input ends in one :class:`~lrc.errors.ConfigError` naming the config
group and the option, before any heavy work.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lrc.allocators.base import Allocator
from lrc.allocators.keep_dense import KeepDense
from lrc.budget import check_ratio
from lrc.compress.layerwise import LayerwiseOptions
from lrc.compress.stage import Method
from lrc.config.schema import check_options, resolve_target
from lrc.data.windows import Calibration
from lrc.errors import ConfigError, LrcError
from lrc.eval.cloze import ClozeTask
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.eval.zeroshot import ZeroShotBenchmark
from lrc.model.loading import LoadedModel, resolve_device
from lrc.paths import cache_root
from lrc.pipeline import RunSpec, Settings
from lrc.stats.storage import StatisticsStorage

log = logging.getLogger("lrc")


def plain(node: Any) -> dict[str, Any]:
    """A config node as plain data (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with a one-line error naming the config group and the bad option;
    ``kwargs`` are passed at the call (a ``_partial_`` target).

    A ``name`` key labels a group's choice for records and reports and is not passed on,
    unless the target takes a ``name`` (a dataset's configuration name).
    """
    spec = plain(node)
    target = resolve_target(spec["_target_"], what) if "_target_" in spec else None
    if "name" in spec and (target is None or "name" not in takes(target)):
        spec.pop("name")
    if target is not None:
        check_options(target, spec, what)
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


def construct(cls: type, options: Mapping[str, Any], what: str, **given: Any) -> Any:
    """``cls(**given, **options)`` with the config's ``options`` type-checked first (``given``:
    objects already built)."""
    check_options(cls, dict(options), what)
    return cls(**given, **options)


def takes(target: Any) -> set[str]:
    """The keyword options ``target`` accepts."""
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def build_benchmarks(cfg: DictConfig) -> list[PerplexityBenchmark | ZeroShotBenchmark]:
    benches: list[PerplexityBenchmark | ZeroShotBenchmark] = []
    for name, node in (cfg.benchmark.get("perplexity") or {}).items():
        opts = plain(node)
        opts.pop("source")
        source = build(node.source, f"benchmark.perplexity.{name}.source")
        benches.append(construct(PerplexityBenchmark, opts, f"benchmark.perplexity.{name}", name=name, source=source))
    zeroshot = cfg.benchmark.get("zeroshot")
    if zeroshot:
        opts, nodes = plain(zeroshot), zeroshot.get("cloze") or {}
        opts.pop("cloze", None)
        cloze = tuple(build_cloze(name, nodes[name]) for name in nodes if nodes[name] is not None)  # null: dropped
        bench = construct(ZeroShotBenchmark, opts, "benchmark.zeroshot", cloze=cloze)
        bench.check()  # unknown task names fail here, before the model is loaded
        benches.append(bench)
    if not benches:
        raise ConfigError(f"benchmark={cfg.benchmark.get('name')!r} defines no benchmark")
    return benches


def build_cloze(name: str, node: DictConfig) -> ClozeTask:
    """The cloze task ``benchmark.zeroshot.cloze.<name>`` over its text ``source``."""
    opts = plain(node)
    opts.pop("source", None)
    if not OmegaConf.is_dict(node.get("source")) or "_target_" not in node.source:
        raise ConfigError(f"benchmark.zeroshot.cloze.{name}: source={node.get('source')!r} is not a text source "
                          "(a node with _target_, e.g. lrc.data.sources.TextFile and its path)")
    source = build(node.source, f"benchmark.zeroshot.cloze.{name}.source")
    return construct(ClozeTask, opts, f"benchmark.zeroshot.cloze.{name}", name=name, source=source)


def layerwise_options(cfg: DictConfig) -> LayerwiseOptions:
    return construct(LayerwiseOptions, plain(cfg.get("layerwise") or {}), "layerwise")


def statistics_storage(cfg: DictConfig) -> StatisticsStorage:
    return construct(StatisticsStorage, plain(cfg.get("statistics") or {}), "statistics")


def build_allocator(node: DictConfig) -> Allocator:
    """The allocator of ``node``; a non-empty ``keep_dense`` wraps it in :class:`KeepDense`."""
    spec = plain(node)
    keep = spec.pop("keep_dense", None) or []
    what = f"allocator={spec.get('name')}"
    if not isinstance(keep, list):
        raise ConfigError(f"{what}: keep_dense={keep!r} must be a list of projection names, e.g. [v_proj]")
    allocator = build(spec, what)
    return KeepDense(allocator, keep) if keep else allocator


def build_finetune(cfg: DictConfig) -> Any:
    """The recovery fine-tuning of ``finetune`` (None for ``finetune=none`` or a record without one)."""
    node = cfg.get("finetune")
    if not node or not node.get("_target_"):
        return None
    what = f"finetune={node.get('name')}"
    spec = plain(node)
    source = build(node.source, f"{what}: source")
    spec.pop("source")
    target = resolve_target(spec.pop("_target_"), what)
    spec.pop("name", None)
    return construct(target, spec, what, source=source)


def build_calibration(cfg: DictConfig) -> Calibration:
    node = cfg.calibration
    source = build(node.source, "calibration.source")
    opts = {k: node[k] for k in ("nsamples", "seqlen", "seed", "sampling", "batch_size") if k in node}
    validation = build(node.validation, "calibration.validation") if node.get("validation") else None
    return construct(Calibration, opts, "calibration", source=source, validation=validation)


@dataclass(frozen=True)
class RunOptions:
    """The schema of the run's own options at the top of ``conf/config.yaml``."""

    ratio: float
    seed: int
    trials: int
    device: str
    dtype: str
    method_name: Optional[str] = None  # noqa: UP045 - OmegaConf needs typing.Optional


@dataclass(frozen=True)
class RunSwitches:
    """The run's switches (``conf/config.yaml``)."""

    force: bool = False
    save: bool = False
    merge: bool = False
    measure_forward: bool = True
    decomposition_cache: bool = False


def check_run_options(cfg: DictConfig) -> None:
    for schema in (RunOptions, RunSwitches):
        names = [f.name for f in fields(schema)]
        check_options(schema, {k: cfg[k] for k in names if k in cfg}, "config")


def run_spec(cfg: DictConfig, benchmarks: bool = True, run_dir: Path | None = None) -> RunSpec:
    """Validate and build every part of the config (bad input fails here, before any heavy work);
    ``benchmarks=False`` builds none and times no plain forward (re-compressing to export)."""
    check_run_options(cfg)
    factorizer = build(cfg.factorizer, f"factorizer={cfg.get('factorizer', {}).get('name')}")
    method = Method(factorizer=factorizer, allocator=build_allocator(cfg.allocator))
    settings = Settings(cache_dir=cache_root(cfg.cache_dir), device=resolve_device(cfg.device),
                        layerwise=layerwise_options(cfg), measure_forward=bool(cfg.measure_forward and benchmarks),
                        run_dir=run_dir, decomposition_cache=bool(cfg.get("decomposition_cache", False)),
                        statistics=statistics_storage(cfg))
    return RunSpec(method=method, ratio=check_ratio(cfg.ratio), calibration=build_calibration(cfg),
                   benchmarks=build_benchmarks(cfg) if benchmarks else [], settings=settings,
                   finetune=build_finetune(cfg))


def load_model(cfg: DictConfig, spec: RunSpec) -> tuple[LoadedModel, float]:
    """The model (on the host in layer-wise mode, which moves one block at a time to the device)
    and the seconds loading took."""
    start = time.perf_counter()
    load_on = {"device": "cpu"} if spec.settings.layerwise.enabled else {}
    loaded = build(OmegaConf.merge(cfg.model.load, load_on), f"model={cfg.model.get('name')}")
    seconds = time.perf_counter() - start
    log.info("loaded %s (%s) on %s in %.1fs", cfg.model.get("name"), type(loaded.model).__name__, loaded.device,
             seconds)
    return loaded, seconds


# Where targets lived before the package was split into stage folders (records written then
# still re-run, resume and export): old module -> new module.
MOVED_TARGETS = {"lrc.calibration.": "lrc.data.sources.", "lrc.models.": "lrc.model.loading.",
                 "lrc.streamed.": "lrc.model.streamed.", "lrc.tracking.": "lrc.results.tracking."}


def current_targets(config: Any) -> Any:
    """``config`` (plain data) with every ``_target_`` of a moved module renamed."""
    if isinstance(config, dict):
        return {k: _moved(v) if k == "_target_" else current_targets(v) for k, v in config.items()}
    if isinstance(config, list):
        return [current_targets(v) for v in config]
    return config


def _moved(target: Any) -> Any:
    for old, new in MOVED_TARGETS.items():
        if isinstance(target, str) and target.startswith(old):
            return new + target[len(old):]
    return target


# What a run recorded before an option existed ran with (so exporting it rebuilds its model).
RECORD_DEFAULTS = {"statistics": {"precision": "float64"}}
FACTORIZER_RECORD_DEFAULTS = {"route": "svd"}


def from_record(config: Mapping[str, Any]) -> DictConfig:
    """The config a run recorded (``result.json``'s ``config``), ready for :func:`run_spec`."""
    config = {**RECORD_DEFAULTS, **current_targets(dict(config))}
    if isinstance(config.get("factorizer"), dict):
        config["factorizer"] = {**FACTORIZER_RECORD_DEFAULTS, **config["factorizer"]}
    return OmegaConf.create(config)
