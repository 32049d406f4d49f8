"""The analysis notebook executes top to bottom on a small results folder."""

import json

import nbformat
from conftest import REPO
from nbclient import NotebookClient
from test_report import record, write


def test_compare_methods_notebook_executes(tmp_path, monkeypatch):
    results = tmp_path / "results"
    for i, (alloc, ratio, ppl) in enumerate([("uniform", 0.2, 100.0), ("uniform", 0.4, 180.0),
                                             ("bayes", 0.2, 72.0), ("bayes", 0.4, 150.0)]):
        write(results, f"{i}_run", record(alloc, "svdllm", ratio, ppl, acc=0.5))
    write(results, "4_failed", {"status": "failed", "error": "ConfigError: boom", "config": {}})
    monkeypatch.setenv("LRC_RESULTS", str(results))
    nb = nbformat.read(REPO / "notebooks" / "compare_methods.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = json.dumps([o.get("text", "") for o in outputs] + [o.get("data", {}).get("text/plain", "") for o in outputs])
    assert "5 runs under" in text and "bayes x svdllm 72.0" in text and "ConfigError: boom" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # ppl, accuracy, ranks figures
