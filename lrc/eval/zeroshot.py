"""Zero-shot accuracy through lm-eval, on the in-memory (compressed) model.

The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` and evaluated with
``lm_eval.simple_evaluate``; lm-eval's own task registry is used, plus lrc's offline suite
(``lrc/eval/tasks/offline``: BIG-bench multiple-choice tasks shipped in the package, tag
``lrc_offline``), so ``tasks`` may name either; ``cloze`` adds LAMBADA-style tasks built from
lrc text sources (:mod:`lrc.eval.cloze`).

Every task reports ``lm_eval/<task>/<metric>`` with lm-eval's standard error
``<metric>_stderr`` (sample standard deviation / sqrt(n)), its ``chance`` level (the mean of
1 / number of choices over its examples for multiple choice, 0 for exact match) and
``acc_above_chance`` = (acc - chance) / (1 - chance): 0 at chance, 1 when always right, so
tasks with different numbers of choices average fairly. The suite's summaries are
``lm_eval/mean_acc`` (the plain mean over tasks, as the papers report) and
``lm_eval/mean_acc_above_chance`` (the tasks' accuracies above chance, each task weighted
by its examples), each with the standard error of a weighted mean of independent estimates.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lrc.errors import ConfigError
from lrc.eval.cloze import ClozeTask

log = logging.getLogger(__name__)

OFFLINE_TASKS = Path(__file__).resolve().parent / "tasks" / "offline"
METRICS = ("acc", "acc_norm", "word_logprob")
STDERR = "_stderr"
# lm-eval computes a metric's standard error only when bootstrap_iters > 0; for a mean (every
# metric lrc reports) it is the closed form, so this number only matters for bootstrapped ones
BOOTSTRAP_ITERS = 1000


@cache
def task_manager(extra: tuple[str, ...] = (), defaults: bool = True) -> Any:
    """lm-eval's task registry plus lrc's offline suite (``defaults=False``: without lm-eval's
    own few thousand tasks, which take a while to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=[str(OFFLINE_TASKS), *extra], include_defaults=defaults)


@dataclass(frozen=True)
class ZeroShotBenchmark:
    """lm-eval tasks (or tags/groups) and cloze tasks; reported as ``lm_eval/<task>/<metric>``."""

    tasks: tuple[str, ...] = ()
    batch_size: int = 16
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int = 0
    include_path: tuple[str, ...] = field(default=())  # extra folders of lm-eval task YAMLs
    samples: bool = False  # keep every scored example (logged to W&B as one table per task)
    cloze: tuple[ClozeTask, ...] = ()
    name: ClassVar[str] = "zeroshot"
    _tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "include_path", tuple(self.include_path))
        object.__setattr__(self, "cloze", tuple(self.cloze))
        if not self.tasks and not self.cloze:
            raise ConfigError("zeroshot: no tasks given")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"zeroshot: batch_size={self.batch_size!r} must be a positive integer")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"zeroshot: limit={self.limit!r} must be a positive integer or null")

    def registry(self) -> Any:
        """The smallest task registry that knows every task (lm-eval's own only when needed)."""
        local = task_manager(self.include_path, defaults=False)
        if all(t in local.all_tasks for t in self.tasks):
            return local
        return task_manager(self.include_path)

    def check(self) -> None:
        """Raise a ConfigError naming every task lm-eval does not know, or a cloze text with no
        example (no model needed)."""
        for cloze in self.cloze:
            cloze.examples()
        if not self.tasks:
            return
        known = set(self.registry().all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            offline = sorted(t for t in task_manager(self.include_path, defaults=False).all_tasks)
            raise ConfigError(f"unknown lm-eval task(s) {unknown}; offline tasks and tags: {offline}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": list(self.tasks), "limit": self.limit, "num_fewshot": self.num_fewshot,
                "include_path": list(self.include_path), "cloze": [c.describe() for c in self.cloze],
                "protocol": 2}  # samples: no effect on metrics

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        self.check()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        tasks = [*self.tasks, *(c.lm_eval_task() for c in self.cloze)]
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=self.num_fewshot,
                                      limit=self.limit, task_manager=self.registry(),
                                      log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS, verbosity="ERROR")
        samples = out.get("samples") or {}
        chances = {task: chance(rows, out["configs"][task]["output_type"]) for task, rows in samples.items()}
        self._tables.clear()
        if self.samples:
            for task, rows in samples.items():
                self._tables[f"lm_eval_samples/{task}"] = sample_table(rows)
        sizes = {task: len(rows) for task, rows in samples.items()}
        return flatten(out["results"], set(out.get("groups", {})), chances, sizes)

    def tables(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """``{key: (columns, rows)}`` of the last run's examples when ``samples`` is on."""
        return dict(self._tables)


def sample_table(samples: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per scored example: id, target, the log-likelihood of every choice, acc."""
    columns = ["doc_id", "target", "loglikelihoods", "acc", "acc_norm", "prompt"]
    rows = []
    for s in samples:
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else r for r in s.get("filtered_resps", [])]
        prompt = s["arguments"][0][0] if s.get("arguments") else ""
        rows.append([s.get("doc_id"), s.get("target"), json.dumps(lls), s.get("acc"), s.get("acc_norm"), prompt])
    return columns, rows


def chance(samples: list[dict[str, Any]], output_type: str) -> float:
    """A task's chance accuracy: the mean of 1 / number of choices over its examples for
    multiple choice (guessing uniformly), 0 for exact match of a free continuation."""
    if output_type != "multiple_choice" or not samples:
        return 0.0
    return sum(1.0 / len(s["filtered_resps"]) for s in samples) / len(samples)


def flatten(results: dict[str, dict[str, Any]], groups: set[str] = frozenset(),
            chances: dict[str, float] | None = None, sizes: dict[str, int] | None = None) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": 0.5, "acc_stderr,none": 0.05, ...}}`` as
    ``{"lm_eval/task/acc": 0.5, "lm_eval/task/acc_stderr": 0.05, ...}``; with the tasks'
    ``chances``, also each task's ``chance`` and ``acc_above_chance`` (+ stderr). Summaries
    over the tasks (group aggregates excluded), each with its ``_stderr`` where every task has one:

    * ``lm_eval/mean_acc``: the plain mean of the tasks' accuracies (the papers' "average");
    * ``lm_eval/mean_acc_above_chance`` (with chances): the tasks' ``acc_above_chance`` (each
      normalised by its task's mean chance) weighted by their ``sizes`` (examples; equal
      weights without sizes), as lm-eval's size-weighted groups do, so a task with more
      examples counts more; standard error sqrt(sum (w_i se_i)²) / sum w_i.

    Chance is taken per task as the mean of 1 / choices; it assumes one gold answer, one
    request per choice and one filter (lm-eval's ``acc_mutual_info`` doubles the requests and
    would halve it; lrc's tasks use none of these).
    """
    chances, sizes = chances or {}, sizes or {}
    metrics: dict[str, float] = {}
    plain: list[tuple[float, float | None]] = []
    above: list[tuple[float, float | None, float]] = []  # (value, stderr, weight)
    for task, values in sorted(results.items()):
        for key, value in values.items():
            metric = key.partition(",")[0]
            if metric.removesuffix(STDERR) in METRICS and isinstance(value, (int, float)):
                metrics[f"lm_eval/{task}/{metric}"] = float(value)
        acc, se = values.get("acc,none"), values.get("acc_stderr,none")
        if task in groups or not isinstance(acc, (int, float)):
            continue
        se = float(se) if isinstance(se, (int, float)) else None
        plain.append((float(acc), se))
        if task in chances and chances[task] < 1.0:
            c = chances[task]
            value, value_se = (acc - c) / (1.0 - c), se / (1.0 - c) if se is not None else None
            metrics[f"lm_eval/{task}/chance"] = c
            metrics[f"lm_eval/{task}/acc_above_chance"] = value
            if value_se is not None:
                metrics[f"lm_eval/{task}/acc_above_chance{STDERR}"] = value_se
            above.append((value, value_se, float(sizes.get(task, 1))))
    for name, values in (("mean_acc", [(v, se, 1.0) for v, se in plain]), ("mean_acc_above_chance", above)):
        if not values:
            continue
        total = sum(w for _, _, w in values)
        metrics[f"lm_eval/{name}"] = sum(v * w for v, _, w in values) / total
        if all(se is not None for _, se, _ in values):
            metrics[f"lm_eval/{name}{STDERR}"] = math.sqrt(sum((se * w) ** 2 for _, se, w in values)) / total
    return metrics
