"""End-to-end runs through the real entry point on the tiny random model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose

from lrc.results.records import read_record, validate_record
from lrc.run import run

TINY = ["model=tiny-random", "device=cpu", "logger=none", "calibration.nsamples=4", "calibration.seqlen=64",
        "benchmark.perplexity.embedded.seqlen=64", "benchmark.perplexity.embedded.max_windows=20"]


def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "lrc.run", *args, f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_end_to_end_writes_a_valid_record(tmp_path):
    proc = cli([*TINY, "ratio=0.3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_record(tmp_path / "result.json")
    assert record["status"] == "done"
    assert validate_record(record) == []
    assert record["config"]["ratio"] == 0.3
    assert set(record["metrics"]) == {"ppl/embedded"}
    params = record["params"]
    slack = sum(sum(shape) for shape in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]) * 2
    assert 0.3 <= params["removed_fraction"] <= 0.3 + slack / params["target_before"]
    assert params["model_after"] == params["model_before"] - (params["target_before"] - params["target_after"])
    assert len(record["ranks"]) == 14
    # the run prints dense vs compressed perplexity and where the record is
    assert "ppl/embedded: dense" in proc.stdout and "-> compressed" in proc.stdout
    assert f"result: {tmp_path / 'result.json'}" in proc.stdout


def test_same_config_twice_is_identical(tmp_path):
    a = run(compose([*TINY, "factorizer=svdllm"]), tmp_path / "a")
    b = run(compose([*TINY, "factorizer=svdllm"]), tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["ranks"] == b["ranks"]
    assert b["diagnostics"]["statistics_cached"] and b["diagnostics"]["dense_metrics_cached"]
    fresh = run(compose([*TINY, "factorizer=svdllm", f"cache_dir={tmp_path / 'fresh-cache'}"]), tmp_path / "c")
    assert not fresh["diagnostics"]["statistics_cached"]
    assert fresh["metrics"] == a["metrics"]


def test_svd_needs_no_statistics(tmp_path):
    record = run(compose([*TINY, "factorizer=svd"]), tmp_path)
    assert "statistics_cached" not in record["diagnostics"]
    assert record["metrics"]["ppl/embedded"] > 0


@pytest.mark.parametrize("args, message", [
    (["ratio=1.5"], "ratio=1.5 is outside (0, 1)"),
    (["ratio=0"], "ratio=0 is outside (0, 1)"),
    (["model=hf", "model.load.name_or_path=/no/such/model"], "model path '/no/such/model' does not exist"),
    (["allocator=nosuch"], "Could not find 'allocator/nosuch'"),
    (["calibration=textfile", "calibration.path=SHORT", "calibration.seqlen=512"],
     "shorter than one window of seqlen=512"),
    (["+factorizer.bogus=1"], "bogus"),
    (["benchmark=offline", "benchmark.zeroshot.tasks=[lrc_offline,no_such_task]"],
     "unknown lm-eval task(s) ['no_such_task']"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    args = [a.replace("SHORT", str(short)) for a in args]
    proc = cli([*TINY, *args], tmp_path / "run")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    record_path = tmp_path / "run" / "result.json"
    if record_path.exists():
        assert json.loads(record_path.read_text())["status"] == "failed"


@pytest.mark.parametrize("args, message", [
    (["allocator=ressvd_plc", "allocator.k=1", "ratio=0.6"], "k=1 must exceed N*R = 2*0.6 = 1.2"),
    (["allocator=bayes", "trials=0"], "n_trials=0 must be an integer >= 1"),
    (["allocator=bayes", "allocator.groups=[[qkv_proj],[o_proj]]"], "unknown group name(s) ['qkv_proj']"),
    (["allocator=mgaa", "allocator.inner=best"], "inner='best' is not one of"),
])
def test_bad_allocator_input_fails_before_heavy_work(args, message, tmp_path):
    cache = tmp_path / "cache"
    proc = cli([*TINY, *args, f"cache_dir={cache}"], tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (cache / "stats").exists() and not (cache / "dense").exists()  # nothing heavy started


def test_multirun_sweep_records_each_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lrc.run", "-m", *TINY, "factorizer=svd,svdllm", "ratio=0.2,0.4",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [read_record(p) for p in sorted(tmp_path.glob("*/result.json"))]
    assert len(records) == 4
    assert {(r["config"]["factorizer"]["name"], r["config"]["ratio"]) for r in records} == {
        ("svd", 0.2), ("svd", 0.4), ("svdllm", 0.2), ("svdllm", 0.4)}
    assert all(r["status"] == "done" for r in records)


@pytest.mark.parametrize("factorizer", sorted(p.stem for p in (REPO / "conf" / "factorizer").glob("*.yaml")))
def test_every_factorizer_runs_end_to_end(factorizer, tmp_path):
    record = run(compose([*TINY, f"factorizer={factorizer}", "ratio=0.4"]), tmp_path)
    assert record["status"] == "done" and validate_record(record) == []
    assert 0.4 <= record["params"]["removed_fraction"] < 0.5
    ppl = record["metrics"]["ppl/embedded"]
    assert ppl == ppl and ppl > 1  # finite
    errors = record["diagnostics"]["truncation_error"]
    assert len(errors) == 14 and all(e >= 0 for e in errors.values())
    params = record["params"]  # every stored parameter is in target_after, added biases included
    assert params["model_after"] == params["model_before"] - (params["target_before"] - params["target_after"])
    pairs = list(zip(SHAPES, record["ranks"].values(), strict=True))
    factors = sum(r * (m + n) for (m, n), r in pairs if r * (m + n) < m * n)
    dense = sum(m * n for (m, n), r in pairs if r * (m + n) >= m * n)
    added = record["diagnostics"]["added_params"]
    if factorizer == "feature_pca":  # bias compensation adds one bias per compressed matrix
        assert added == {name: shape[0] for name, shape in record["diagnostics"]["shapes"].items()}
    else:
        assert added == {}
    assert params["target_after"] == factors + dense + sum(added.values())


SEARCH = ["trials=3", "allocator.validation.nsamples=2", "allocator.validation.seqlen=64"]
ALLOCATOR_ARGS = {"uniform": [], "energy": [], "mgaa": [], "bayes": [*SEARCH, "allocator.startup_trials=2"],
                  "ressvd_plc": SEARCH[1:], "asvd": ["allocator.validation.seqlen=64"],
                  "bolaco": [*SEARCH, "allocator.startup_trials=1"],
                  "bolaco_lrc": [*SEARCH, "allocator.startup_trials=1"]}


@pytest.mark.parametrize("allocator", sorted(p.stem for p in (REPO / "conf" / "allocator").glob("*.yaml")))
def test_every_allocator_runs_end_to_end(allocator, tmp_path):
    record = run(compose([*TINY, f"allocator={allocator}", *ALLOCATOR_ARGS[allocator], "ratio=0.4"]), tmp_path)
    assert record["status"] == "done" and validate_record(record) == []
    params = record["params"]
    assert params["target_before"] * 0.6 >= params["target_after"]  # never over the budget
    assert params["removed_fraction"] < 0.4 + sum(m + n for m, n in SHAPES) / params["target_before"]
    if allocator == "bayes":
        assert [t["trial"] for t in record["trials"]] == [0, 1, 2]
        assert (tmp_path / "trials.csv").read_text().splitlines()[0].startswith("trial,")
        assert record["diagnostics"]["allocation"]["best_objective"] == min(t["objective"] for t in record["trials"])
    if allocator == "ressvd_plc":  # N R = 0.8: k = 1 or 2, the first N - k blocks dense
        k = record["diagnostics"]["allocation"]["k"]
        assert [t["k"] for t in record["trials"]] == [1, 2]
        dense = [n for n, r in record["ranks"].items() if int(n.split(".")[2]) < 2 - k]
        assert all(record["ranks"][n] in (32, 64) for n in dense)
    if allocator == "mgaa":
        assert len(record["diagnostics"]["allocation"]["sublayer_cosine"]) == 4


SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2


def test_rerunning_a_sweep_skips_finished_runs(tmp_path):
    def sweep(*extra):
        proc = subprocess.run([sys.executable, "-m", "lrc.run", "-m", *TINY, "ratio=0.2,0.4", *extra,
                               f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    sweep()
    paths = sorted(tmp_path.glob("*/result.json"))
    assert len(paths) == 2
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].write_text(json.dumps({"status": "failed", "error": "killed", "config": {}}))
    out = sweep()
    assert out.count("already done, skipped") == 1  # the finished run is kept, the failed one recomputed
    assert paths[0].stat().st_mtime_ns == stamps[0]
    assert read_record(paths[1])["status"] == "done"
    out = sweep("force=true")
    assert "already done" not in out and paths[0].stat().st_mtime_ns != stamps[0]


def test_sweep_job_folders_are_one_level_whatever_the_values(tmp_path):
    """A path in an override must not nest job folders (`calibration.path=/data/my.txt`)."""
    text = tmp_path / "data" / "my.txt"
    text.parent.mkdir()
    text.write_text("Plain words for a tiny calibration set. " * 400)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "lrc.run", "-m", *TINY, "calibration=textfile",
                           f"calibration.path={text}", "ratio=0.2,0.3", f"hydra.sweep.dir={tmp_path}/sweep"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(jobs) == 2
    assert all((job / "result.json").is_file() for job in jobs)  # the records sit one level down
    assert all("calibration.path=_" in job.name for job in jobs)  # the slashes made harmless


def test_job_dirname_is_a_single_short_path_component():
    from lrc.run import job_dirname

    assert job_dirname("a=1,calibration.path=/x/y.txt") == "a=1,calibration.path=_x_y.txt"
    long = job_dirname("k=" + "v" * 400)
    assert len(long.encode()) <= 200 and "/" not in long and long != job_dirname("k=" + "v" * 399)
