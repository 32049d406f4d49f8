"""From a composed config to the plain typed objects of a run (:class:`lrc.pipeline.RunSpec`).

The one place besides the entry point that reads OmegaConf: every option is type-checked
against its target's signature (:mod:`lrc.config.schema`) and built with Hydra's
``instantiate``; bad input ends in one :class:`~lrc.errors.ConfigError` naming the config
group and the option, before any heavy work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lrc.allocators.base import Allocator
from lrc.allocators.keep_dense import KeepDense
from lrc.budget import check_ratio
from lrc.compress.layerwise import LayerwiseOptions
from lrc.compress.stage import Method
from lrc.config.schema import check_options
from lrc.data.windows import Calibration
from lrc.errors import ConfigError, LrcError
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.eval.zeroshot import ZeroShotBenchmark
from lrc.model.loading import LoadedModel, resolve_device
from lrc.paths import cache_root
from lrc.pipeline import RunSpec, Settings

log = logging.getLogger("lrc")


def plain(node: Any) -> dict[str, Any]:
    """A config node as plain data (interpolations resolved)."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def build(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate`` with a one-line error naming the config group and the bad option.

    A ``name`` key labels the choice for records and reports and is not passed on.
    """
    spec = plain(node)
    spec.pop("name", None)
    if "_target_" in spec:
        check_options(spec["_target_"], {**spec, **kwargs}, what)
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
    """``cls(**given, **options)`` with its options type-checked first."""
    check_options(cls, {**given, **options}, what)
    return cls(**given, **options)


def build_benchmarks(cfg: DictConfig) -> list[PerplexityBenchmark | ZeroShotBenchmark]:
    benches: list[PerplexityBenchmark | ZeroShotBenchmark] = []
    for name, node in (cfg.benchmark.get("perplexity") or {}).items():
        opts = plain(node)
        opts.pop("source")
        source = build(node.source, f"benchmark.perplexity.{name}.source")
        benches.append(construct(PerplexityBenchmark, opts, f"benchmark.perplexity.{name}", name=name, source=source))
    zeroshot = cfg.benchmark.get("zeroshot")
    if zeroshot:
        bench = construct(ZeroShotBenchmark, plain(zeroshot), "benchmark.zeroshot")
        bench.check()  # unknown task names fail here, before the model is loaded
        benches.append(bench)
    if not benches:
        raise ConfigError(f"benchmark={cfg.benchmark.get('name')!r} defines no benchmark")
    return benches


def layerwise_options(cfg: DictConfig) -> LayerwiseOptions:
    spec = plain(cfg.get("layerwise") or {})
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
    spec = plain(node)
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


def check_run_options(cfg: DictConfig) -> None:
    for schema in (RunOptions, RunSwitches):
        names = [f.name for f in fields(schema)]
        check_options(schema, {k: cfg[k] for k in names if k in cfg}, "config")


def run_spec(cfg: DictConfig, benchmarks: bool = True) -> RunSpec:
    """Validate and build every part of the config (bad input fails here, before any heavy work);
    ``benchmarks=False`` builds none and times no plain forward (re-compressing to export)."""
    check_run_options(cfg)
    factorizer = build(cfg.factorizer, f"factorizer={cfg.get('factorizer', {}).get('name')}")
    method = Method(factorizer=factorizer, allocator=build_allocator(cfg.allocator))
    settings = Settings(cache_dir=cache_root(cfg.cache_dir), device=resolve_device(cfg.device),
                        layerwise=layerwise_options(cfg), measure_forward=bool(cfg.measure_forward and benchmarks))
    return RunSpec(method=method, ratio=check_ratio(cfg.ratio), calibration=build_calibration(cfg),
                   benchmarks=build_benchmarks(cfg) if benchmarks else [], settings=settings)


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


def from_record(config: Mapping[str, Any]) -> DictConfig:
    """The config a run recorded (``result.json``'s ``config``), ready for :func:`run_spec`."""
    return OmegaConf.create(dict(config))
