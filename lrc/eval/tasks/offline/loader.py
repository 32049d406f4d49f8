"""Datasets of the offline zero-shot suite, read from the package (never the working directory).

lm-eval calls these through ``custom_dataset: !function loader.<task>`` in the task YAMLs.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str, **kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA / f"{name}.jsonl")})


def movie_recommendation(**kwargs):
    return _load("movie_recommendation")


def ruin_names(**kwargs):
    return _load("ruin_names")
