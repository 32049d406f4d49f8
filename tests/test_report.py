import json

from lrc.report import collect, main, markdown, rows


def record(factorizer, ratio, ppl, status="done"):
    return {"status": status, "config": {"allocator": {"name": "uniform"}, "factorizer": {"name": factorizer},
                                         "ratio": ratio},
            "params": {"removed_fraction": ratio + 0.001}, "metrics": {"ppl/x": ppl}, "dense_metrics": {"ppl/x": 10.0},
            "timings": {"total_s": 3.0}}


def test_table_rows_and_values(tmp_path, capsys):
    for i, (fac, ratio, ppl) in zip((2, 10), [("svd", 0.2, 1000.0), ("svdllm", 0.2, 25.0)], strict=True):
        (tmp_path / f"{i}_run").mkdir()
        (tmp_path / f"{i}_run" / "result.json").write_text(json.dumps(record(fac, ratio, ppl)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text("{not json")
    records, problems = collect(tmp_path)
    assert len(records) == 2 and len(problems) == 1 and "bad" in problems[0]
    header, table = rows(records)
    assert header[:5] == ["allocator", "factorizer", "ratio", "removed", "status"]
    assert table[0][1] == "svd" and table[0][5] == "1000" and table[0][7] == "100"
    assert table[1][1] == "svdllm" and table[1][7] == "2.5"
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "| uniform | svdllm | 0.2 |" in out.out and "skipped" in out.err
    assert markdown(header, table).count("\n") == 3


def test_no_results_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no result.json records" in capsys.readouterr().err
