"""Zero-shot accuracy through lm-eval on the in-memory model, with the offline suite."""

import json

import pytest
import torch
from conftest import compose

from lrc.config.build import build_benchmarks
from lrc.errors import ConfigError
from lrc.eval.tasks.build_offline import TASKS
from lrc.eval.zeroshot import OFFLINE_TASKS, ZeroShotBenchmark, flatten


def test_offline_suite_ships_its_data():
    for task in TASKS:
        rows = [json.loads(line) for line in (OFFLINE_TASKS / "data" / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) >= 80
        assert all(0 <= r["label"] < len(r["choices"]) and r["question"] for r in rows)


def test_tiny_model_on_local_tasks_from_another_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths resolve from the package, not the working directory
    bench = ZeroShotBenchmark(tasks=("lrc_offline",), limit=4, batch_size=8)
    metrics = bench.run(tiny.model, tiny.tokenizer)
    tasks = {f"lm_eval/lrc_{t}/acc" for t in TASKS}
    assert tasks <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in tasks)
    assert metrics["lm_eval/mean_acc"] == pytest.approx(sum(metrics[k] for k in tasks) / len(tasks))
    assert bench.tables() == {}  # examples are kept only when asked for


def test_samples_are_kept_as_tables_when_asked(tiny):
    bench = ZeroShotBenchmark(tasks=("lrc_strategyqa",), limit=3, samples=True)
    metrics = bench.run(tiny.model, tiny.tokenizer)
    columns, rows = bench.tables()["lm_eval_samples/lrc_strategyqa"]
    assert len(rows) == 3 and columns[:2] == ["doc_id", "target"]
    accs = [row[columns.index("acc")] for row in rows]
    assert sum(accs) / 3 == pytest.approx(metrics["lm_eval/lrc_strategyqa/acc"])
    assert all(len(json.loads(row[columns.index("loglikelihoods")])) == 2 for row in rows)  # Yes / No


def test_accuracy_follows_the_model_likelihoods(tiny, tmp_path):
    """A user task folder (include_path) whose gold answer is always "Y": a model pushed towards
    the byte "Y" scores 1, one pushed towards "N" scores 0."""
    data = tmp_path / "yes.jsonl"
    data.write_text("".join(json.dumps({"q": f"Question {i}?", "label": 0}) + "\n" for i in range(6)))
    (tmp_path / "yes.yaml").write_text(
        "task: tiny_yes\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: ['Y', 'N']\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    bench = ZeroShotBenchmark(tasks=("tiny_yes",), include_path=(str(tmp_path),))
    model, head = tiny.model, tiny.model.lm_head
    scores = {}
    try:
        for letter in "YN":  # an LM head with a large bias on one letter
            biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
            biased.weight.data.copy_(head.weight.data)
            biased.bias.data.zero_()
            biased.bias.data[tiny.tokenizer(letter, add_special_tokens=False)["input_ids"][0]] = 100.0
            model.lm_head = biased
            scores[letter] = bench.run(model, tiny.tokenizer)["lm_eval/tiny_yes/acc"]
    finally:
        model.lm_head = head
    assert scores == {"Y": 1.0, "N": 0.0}


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        ZeroShotBenchmark(tasks=("lrc_offline", "no_such_task")).check()
    with pytest.raises(ConfigError, match="limit=0"):
        ZeroShotBenchmark(tasks=("lrc_offline",), limit=0)


def test_offline_bundle_composes_ppl_and_zeroshot():
    benches = build_benchmarks(compose(["benchmark=offline"]))
    assert [type(b).__name__ for b in benches] == ["PerplexityBenchmark", "ZeroShotBenchmark"]
    assert benches[1].tasks == ("lrc_offline",)


def test_flatten_names_metrics_and_skips_groups():
    results = {"grp": {"acc,none": 0.9, "alias": "grp"}, "a": {"acc,none": 0.5, "acc_norm,none": 0.25,
                                                              "acc_stderr,none": "N/A"},
               "b": {"acc,none": 1.0}}
    assert flatten(results, {"grp"}) == {"lm_eval/grp/acc": 0.9, "lm_eval/a/acc": 0.5, "lm_eval/a/acc_norm": 0.25,
                                         "lm_eval/b/acc": 1.0, "lm_eval/mean_acc": 0.75}
