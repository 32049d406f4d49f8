"""Zero-shot accuracy through lm-eval, on the in-memory (compressed) model.

The model is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` and evaluated with
``lm_eval.simple_evaluate``; lm-eval's own task registry is used, plus lrc's offline suite
(``lrc/eval/tasks/offline``: BIG-bench multiple-choice tasks shipped in the package, tag
``lrc_offline``), so ``tasks`` may name either. Results are reported as
``lm_eval/<task>/<metric>`` and ``lm_eval/mean_acc`` (the mean of every task's ``acc``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from lrc.errors import ConfigError

log = logging.getLogger(__name__)

OFFLINE_TASKS = Path(__file__).resolve().parent / "tasks" / "offline"
METRICS = ("acc", "acc_norm")


@cache
def task_manager(extra: tuple[str, ...] = (), defaults: bool = True) -> Any:
    """lm-eval's task registry plus lrc's offline suite (``defaults=False``: without lm-eval's
    own few thousand tasks, which take a while to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=[str(OFFLINE_TASKS), *extra], include_defaults=defaults)


@dataclass(frozen=True)
class ZeroShotBenchmark:
    """lm-eval tasks (or tags/groups); reported as ``lm_eval/<task>/<metric>``."""

    tasks: tuple[str, ...]
    batch_size: int = 16
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int = 0
    include_path: tuple[str, ...] = field(default=())  # extra folders of lm-eval task YAMLs
    samples: bool = False  # keep every scored example (logged to W&B as one table per task)
    name: str = "zeroshot"
    _tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "include_path", tuple(self.include_path))
        if not self.tasks:
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
        """Raise a ConfigError naming every task lm-eval does not know (no model needed)."""
        known = set(self.registry().all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            offline = sorted(t for t in task_manager(self.include_path, defaults=False).all_tasks)
            raise ConfigError(f"unknown lm-eval task(s) {unknown}; offline tasks and tags: {offline}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": list(self.tasks), "limit": self.limit, "num_fewshot": self.num_fewshot,
                "include_path": list(self.include_path), "protocol": 1}  # samples: no effect on metrics

    def run(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        self.check()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), num_fewshot=self.num_fewshot,
                                      limit=self.limit, task_manager=self.registry(),
                                      log_samples=self.samples, bootstrap_iters=0, verbosity="ERROR")
        self._tables.clear()
        for task, samples in (out.get("samples") or {}).items():
            self._tables[f"lm_eval_samples/{task}"] = sample_table(samples)
        return flatten(out["results"], set(out.get("groups", {})))

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


def flatten(results: dict[str, dict[str, Any]], groups: set[str] = frozenset()) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": 0.5, ...}}`` as ``{"lm_eval/task/acc": 0.5, ...}``, plus
    ``lm_eval/mean_acc``: the unweighted mean ``acc`` over the tasks (group aggregates excluded)."""
    metrics: dict[str, float] = {}
    accs = []
    for task, values in sorted(results.items()):
        for key, value in values.items():
            metric = key.partition(",")[0]
            if metric in METRICS and isinstance(value, (int, float)):
                metrics[f"lm_eval/{task}/{metric}"] = float(value)
        if task not in groups and isinstance(values.get("acc,none"), (int, float)):
            accs.append(float(values["acc,none"]))
    if accs:
        metrics["lm_eval/mean_acc"] = sum(accs) / len(accs)
    return metrics
