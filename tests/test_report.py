import csv
import json
from types import SimpleNamespace

import pytest

from lrc.report import collect, collect_wandb, difference, main, markdown, method, pairwise, rows


def record(allocator, factorizer, ratio, ppl, acc=None, status="done"):
    metrics = {"ppl/x": ppl, **({"lm_eval/mean_acc": acc} if acc is not None else {})}
    dense = {"ppl/x": 10.0, **({"lm_eval/mean_acc": 0.6} if acc is not None else {})}
    ranks = {f"model.layers.{b}.self_attn.{k}": 8 + b * (2 if k == "q_proj" else 1) for b in range(4)
             for k in ("q_proj", "k_proj")}
    return {"status": status, "config": {"allocator": {"name": allocator}, "factorizer": {"name": factorizer},
                                         "ratio": ratio},
            "params": {"removed_fraction": ratio + 0.001}, "metrics": metrics, "dense_metrics": dense,
            "timings": {"total_s": 3.0}, "ranks": ranks}


def write(root, name, rec):
    (root / name).mkdir(parents=True)
    (root / name / "result.json").write_text(json.dumps(rec) if isinstance(rec, dict) else rec)


@pytest.fixture
def sweep(tmp_path):
    """A synthetic 2 allocators x 2 ratios sweep, plus a corrupt and a failed record."""
    results = tmp_path / "results"
    runs = [("uniform", 0.2, 100.0, 0.5), ("uniform", 0.4, 180.0, 0.45), ("mgaa", 0.2, 80.0, 0.52),
            ("mgaa", 0.4, 160.0, 0.47)]
    for i, (alloc, ratio, ppl, acc) in enumerate(runs):
        write(results, f"{i}_allocator={alloc},ratio={ratio}", record(alloc, "svdllm", ratio, ppl, acc))
    write(results, "10_bad", "{not json")
    write(results, "11_failed", {"status": "failed", "error": "ConfigError: k=1 must exceed N*R",
                                 "config": {"allocator": {"name": "ressvd_plc"}}})
    return results


def test_table_rows_and_values(sweep):
    records, problems = collect(sweep)
    assert len(records) == 5 and len(problems) == 1 and "10_bad" in problems[0]
    header, table = rows(records)
    assert header[:6] == ["method", "allocator", "factorizer", "ratio", "removed", "status"]
    assert header[6:9] == ["ppl/x", "dense ppl/x", "x dense"]  # perplexity first
    assert [r[1] for r in table] == ["uniform", "uniform", "mgaa", "mgaa", "ressvd_plc"]  # natural order
    assert [r[0] for r in table] == ["-"] * 5  # no method preset named in these runs
    assert table[0][3] == 0.2 and table[0][6] == 100.0 and table[0][8] == 10.0
    assert table[2][header.index("lm_eval/mean_acc")] == 0.52
    assert table[2][header.index("x dense", 10)] == pytest.approx(0.52 / 0.6)
    assert table[4][5] == "failed" and table[4][6] is None
    text = markdown(header, table)
    assert "| - | mgaa | svdllm | 0.2 | 0.201 | done | 80 | 10 | 8 |" in text and text.count("\n") == 6


def test_main_writes_markdown_csv_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--metrics", "mean_acc"]) == 0
    assert "ppl/x" not in capsys.readouterr().out.splitlines()[0]
    assert main([str(sweep), "--out", str(out), "--ranks-of", "2_allocator=mgaa"]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "10_bad" in captured.err
    assert "failed run" in captured.err and "k=1 must exceed" in captured.err
    assert "| - | uniform | svdllm | 0.4 |" in captured.out
    with open(out / "report.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 5 and table[1]["ppl/x"] == "180.0" and table[1]["allocator"] == "uniform"
    assert (out / "report.md").read_text().startswith("| method | allocator |")
    import matplotlib.image

    for name in ("ppl_x_vs_ratio.png", "lm_eval_mean_acc_vs_ratio.png", "ranks_per_layer.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # not a blank canvas: lines, axes, labels


def test_no_results_or_no_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no result.json records" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_wandb_project_source():
    """The W&B source reads config and summary through wandb's public API (a stand-in here)."""
    runs = [SimpleNamespace(id="a1", state="finished", config={"allocator": {"name": "bayes"}, "ratio": 0.2,
                                                                 "factorizer": {"name": "svdllm"}},
                            summary={"ppl/x": 70.0, "dense/ppl/x": 38.0, "removed_fraction": 0.2, "trial/ppl": 5}),
            SimpleNamespace(id="b2", state="crashed", config={}, summary={})]
    api = SimpleNamespace(runs=lambda path: runs if path == "me/lrc" else [])
    records, problems = collect_wandb("me/lrc", api=api)
    assert len(records) == 1 and "b2" in problems[0]
    assert records[0]["metrics"] == {"ppl/x": 70.0} and records[0]["dense_metrics"] == {"ppl/x": 38.0}
    header, table = rows(records)
    assert table[0][:4] == ["-", "bayes", "svdllm", 0.2] and table[0][8] == pytest.approx(70 / 38)


def test_a_method_preset_names_the_row():
    record = {"status": "done", "config": {"method_name": "bolaco", "allocator": {"name": "bayes"},
                                           "factorizer": {"name": "feature_pca"}, "ratio": 0.2},
              "metrics": {"ppl/x": 50.0}, "dense_metrics": {"ppl/x": 10.0}, "params": {}, "timings": {}}
    header, table = rows([record])
    assert table[0][:3] == ["bolaco", "bayes", "feature_pca"] and method(record) == "bolaco"
    assert method({**record, "config": {**record["config"], "method_name": None}}) == "bayes x feature_pca"


def scored(allocator, ratio, value, se):
    """A record with the zero-shot summary and its standard error (dense: 0.40 ± 0.02)."""
    rec = record(allocator, "svdllm", ratio, 50.0)
    m = "lm_eval/mean_acc_above_chance"
    rec["metrics"].update({m: value, m + "_stderr": se, "lm_eval/t/chance": 0.5})
    rec["dense_metrics"].update({m: 0.40, m + "_stderr": 0.02})
    return rec


def test_differences_within_two_standard_errors_are_marked_not_significant(tmp_path, capsys):
    assert difference(0.40, 0.02, 0.34, 0.02)[2] == "+"  # 0.06 > 2 x sqrt(2) x 0.02 = 0.0566
    assert difference(0.40, 0.02, 0.35, 0.02)[2] == "n.s."  # 0.05 < 0.0566
    assert difference(0.30, None, 0.40, 0.02) == pytest.approx((-0.1, None, ""))
    records = [scored("uniform", 0.2, 0.30, 0.02), scored("mgaa", 0.2, 0.35, 0.02), scored("bayes", 0.2, 0.385, 0.02),
               scored("mgaa", 0.4, 0.10, 0.02)]
    header, table = rows(records)
    m = "lm_eval/mean_acc_above_chance"
    start = header.index(m)
    assert header[start:start + 5] == [m, "± se", f"dense {m}", "x dense", "vs dense"]
    assert "lm_eval/t/chance" not in header and m + "_stderr" not in header  # beside their metric, not columns
    assert [row[start + 4] for row in table] == ["-", "n.s.", "n.s.", "-"]
    assert [row[start + 1] for row in table] == [0.02] * 4
    header, pairs = pairwise(records)
    marks = {(a, b): (mark, diff) for _, ratio, a, b, diff, _, mark in pairs}
    assert len(pairs) == 3  # only runs at the same ratio are compared
    assert marks[("uniform x svdllm", "mgaa x svdllm")][0] == "n.s."  # 0.05 apart
    assert marks[("uniform x svdllm", "bayes x svdllm")] == ("-", pytest.approx(-0.085))
    assert marks[("mgaa x svdllm", "bayes x svdllm")][0] == "n.s."
    for i, rec in enumerate(records):
        write(tmp_path / "r", f"{i}_run", rec)
    assert main([str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Differences between runs at the same ratio" in text and "| n.s. |" in text
