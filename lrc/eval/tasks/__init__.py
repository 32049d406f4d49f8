"""lm-eval tasks lrc builds itself: the offline suite (``offline/``) and tasks held in memory."""

from __future__ import annotations

from typing import Any


def in_memory_task(rows: list[dict[str, Any]], **config: Any) -> Any:
    """An lm-eval ConfigurableTask whose test split is ``rows`` (no dataset files); ``config``
    is the rest of the task's lm-eval config (task name, output type, prompt, metrics)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    def dataset(**kwargs: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    return ConfigurableTask(config={"custom_dataset": dataset, "test_split": "test", "metadata": {"version": 1.0},
                                    **config})
