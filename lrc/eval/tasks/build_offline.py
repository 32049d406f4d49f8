"""Rebuild the offline zero-shot suite's data from the BIG-bench sdist on PyPI.

    pip download bigbench==1.0.0 --no-deps --no-binary :all:   # or fetch the .tar.gz directly
    python -m lrc.eval.tasks.build_offline bigbench-1.0.0.tar.gz

Reads each task's ``task.json`` straight from the archive, keeps a fixed, seeded sample of
``TASKS[task]`` multiple-choice examples (the tasks and sizes chosen by screening, see
``offline/README.md`` and :mod:`lrc.eval.tasks.screen_bigbench`) and writes
``lrc/eval/tasks/offline/data/<task>.jsonl``
with ``{"id", "question", "choices", "label"}`` rows. The output is deterministic, so the
shipped files can be checked against a rebuild.
"""

from __future__ import annotations

import argparse
import json
import random
import tarfile
from pathlib import Path

TASKS = {"movie_recommendation": 150, "ruin_names": 100}  # task -> examples shipped
OUT = Path(__file__).parent / "offline" / "data"


def single_answer(task: dict) -> list[dict]:
    """The task's multiple-choice examples with exactly one right answer."""
    return [e for e in task.get("examples", []) if "target_scores" in e
            and sum(1 for v in e["target_scores"].values() if v == 1) == 1]


def rows(task: dict, per_task: int, seed: int) -> list[dict]:
    prefix = task.get("task_prefix", "")
    examples = single_answer(task)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), min(per_task, len(examples))))
    out = []
    for i in chosen:
        e = examples[i]
        choices = list(e["target_scores"])
        label = [e["target_scores"][c] for c in choices].index(1)
        question = prefix + task.get("example_input_prefix", "") + e["input"].strip()
        out.append({"id": i, "question": question, "choices": choices, "label": label})
    return out


def build(sdist: Path, seed: int = 0, out: Path = OUT) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).parts[-2]: m for m in tar.getmembers()
                   if m.name.endswith("/task.json") and Path(m.name).parts[-2] in TASKS
                   and Path(m.name).parts[-3] == "benchmark_tasks"}
        missing = sorted(set(TASKS) - set(members))
        if missing:
            raise SystemExit(f"{sdist}: no task.json for {missing}")
        for name in TASKS:
            task = json.load(tar.extractfile(members[name]))
            data = rows(task, TASKS[name], seed)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
            (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
            counts[name] = len(data)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="bigbench-1.0.0.tar.gz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, n in build(args.sdist, args.seed).items():
        print(f"{name}: {n} examples")


if __name__ == "__main__":
    main()
