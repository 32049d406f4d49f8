"""Zero-shot accuracy through lm-eval on the in-memory model, with the offline suite."""

import json
import statistics

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
        assert len(rows) == TASKS[task]
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
    bench = ZeroShotBenchmark(tasks=("lrc_ruin_names",), limit=3, samples=True)
    metrics = bench.run(tiny.model, tiny.tokenizer)
    columns, rows = bench.tables()["lm_eval_samples/lrc_ruin_names"]
    assert len(rows) == 3 and columns[:2] == ["doc_id", "target"]
    accs = [row[columns.index("acc")] for row in rows]
    assert sum(accs) / 3 == pytest.approx(metrics["lm_eval/lrc_ruin_names/acc"])
    assert all(len(json.loads(row[columns.index("loglikelihoods")])) == 4 for row in rows)  # four names


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


def test_stderr_chance_and_normalised_accuracy_equal_an_independent_computation(tiny, tmp_path):
    """A user task with 2 to 4 choices scored by lm-eval, and the same examples scored here from
    the tiny model's own likelihoods: accuracy, its standard error, chance and accuracy above
    chance agree, as do the suite summaries over two tasks."""
    from test_cloze import continuation_logprobs

    gen = torch.Generator().manual_seed(7)
    words = ["red", "blue", "green", "stone", "river", "cloud", "seven", "apple"]
    docs = []
    for i in range(30):
        k = 2 + i % 3
        picks = torch.randperm(len(words), generator=gen)[:k].tolist()
        docs.append({"q": f"Pick {i}:", "choices": [words[j] for j in picks], "label": i % k})
    for name, rows in (("tiny_pick", docs), ("tiny_pick_two", docs[:12])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in rows))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    bench = ZeroShotBenchmark(tasks=("tiny_pick", "tiny_pick_two"), include_path=(str(tmp_path),), batch_size=8)
    metrics = bench.run(tiny.model, tiny.tokenizer)

    expected = {}
    for name, rows in (("tiny_pick", docs), ("tiny_pick_two", docs[:12])):
        correct = []
        for d in rows:
            lls = [continuation_logprobs(tiny.model, tiny.tokenizer, d["q"], " " + c)[0] for c in d["choices"]]
            correct.append(float(max(range(len(lls)), key=lls.__getitem__) == d["label"]))
        acc, se = statistics.mean(correct), statistics.stdev(correct) / len(correct) ** 0.5
        chance = statistics.mean(1 / len(d["choices"]) for d in rows)
        expected[name] = (acc, se, chance, (acc - chance) / (1 - chance), se / (1 - chance))
        got = [metrics[f"lm_eval/{name}/{m}"] for m in ("acc", "acc_stderr", "chance", "acc_above_chance",
                                                          "acc_above_chance_stderr")]
        assert got == pytest.approx(expected[name], rel=1e-9)
    assert 0 < expected["tiny_pick"][0] < 1  # right on some examples, wrong on others: a real stderr
    (a, sa, _, na, sna), (b, sb, _, nb, snb) = expected["tiny_pick"], expected["tiny_pick_two"]
    assert metrics["lm_eval/mean_acc"] == pytest.approx((a + b) / 2)
    assert metrics["lm_eval/mean_acc_stderr"] == pytest.approx((sa**2 + sb**2) ** 0.5 / 2)
    # the normalised summary weighs each task by its examples (30 and 12)
    assert metrics["lm_eval/mean_acc_above_chance"] == pytest.approx((30 * na + 12 * nb) / 42)
    expected_se = ((30 * sna) ** 2 + (12 * snb) ** 2) ** 0.5 / 42
    assert metrics["lm_eval/mean_acc_above_chance_stderr"] == pytest.approx(expected_se)


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
    results["a"]["acc_stderr,none"], results["b"]["acc_stderr,none"] = 0.1, 0.0
    chances = {"a": 0.5, "b": 0.25}
    got = flatten(results, {"grp"}, chances)
    assert got["lm_eval/a/acc_above_chance"] == 0.0 and got["lm_eval/b/acc_above_chance"] == 1.0
    assert got["lm_eval/a/acc_above_chance_stderr"] == pytest.approx(0.2)
    assert got["lm_eval/mean_acc_above_chance"] == 0.5 and got["lm_eval/mean_acc_stderr"] == pytest.approx(0.05)
    weighted = flatten(results, {"grp"}, chances, {"a": 30, "b": 10})
    assert weighted["lm_eval/mean_acc_above_chance"] == pytest.approx(0.25)  # (30 x 0 + 10 x 1) / 40
    assert weighted["lm_eval/mean_acc_above_chance_stderr"] == pytest.approx(30 * 0.2 / 40)
    assert weighted["lm_eval/mean_acc"] == 0.75  # the plain mean stays unweighted
