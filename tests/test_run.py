"""End-to-end runs through the real entry point on the tiny random model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose

from lrc.errors import DataError
from lrc.results.records import read_record
from lrc.run import run

TINY = ["model=tiny-random", "device=cpu", "logger=none", "calibration.nsamples=4", "calibration.seqlen=64",
        "benchmark.perplexity.embedded.seqlen=64", "benchmark.perplexity.embedded.max_windows=20"]


SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2  # tiny-random's targets


def check_record(record: dict, ratio: float) -> None:
    """A finished record's content, recomputed from its rank plan and the tiny model's shapes."""
    assert record["status"] == "done" and record["config"]["ratio"] == ratio
    shapes, added = record["diagnostics"]["shapes"], record["diagnostics"]["added_params"]
    assert [tuple(s) for s in shapes.values()] == SHAPES and list(record["ranks"]) == list(shapes)
    stored = 0
    for name, rank in record["ranks"].items():
        m, n = shapes[name]
        low_rank = rank * (m + n) < m * n  # else the matrix is kept dense
        stored += (rank * (m + n) + added.get(name, 0)) if low_rank else m * n
    params = record["params"]
    assert params["target_before"] == sum(m * n for m, n in SHAPES)
    assert params["target_after"] == stored
    assert params["removed_fraction"] == pytest.approx(1 - stored / params["target_before"])
    slack = sum(m + n for m, n in SHAPES)  # the budget is met to within one rank step per matrix
    assert ratio <= params["removed_fraction"] < ratio + slack / params["target_before"]
    # every stored parameter is in target_after, added biases included
    assert params["model_after"] == params["model_before"] - (params["target_before"] - stored)
    assert set(record["metrics"]) == set(record["dense_metrics"]) == {"ppl/embedded"}
    assert all(math.isfinite(v) and v > 1 for v in [*record["metrics"].values(), *record["dense_metrics"].values()])
    timings = record["timings"]
    stages = [timings[k] for k in ("load_s", "calibration_s", "allocation_s", "factorization_s", "benchmark_s")]
    assert all(t > 0 for t in stages) and timings["total_s"] >= sum(stages)


def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "lrc.run", *args, f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_tiny_end_to_end_writes_a_valid_record(tmp_path):
    proc = cli([*TINY, "ratio=0.3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_record(tmp_path / "result.json")
    check_record(record, 0.3)
    # the run prints dense vs compressed perplexity and where the record is
    assert "ppl/embedded: dense" in proc.stdout and "-> compressed" in proc.stdout
    assert f"result: {tmp_path / 'result.json'}" in proc.stdout


def test_offline_zero_shot_run_records_errors_and_chance(tmp_path):
    """The offline suite end to end: cloze tasks (chance 0, whose ratio to dense is undefined)
    and multiple choice, every accuracy with its standard error, summaries in the record."""
    args = [*TINY, "ratio=0.3", "benchmark=offline", "benchmark.zeroshot.limit=4",
            "benchmark.zeroshot.cloze.pydocs=null", "benchmark.zeroshot.cloze.embedded.context_words=10"]
    record = run(compose(args), tmp_path)
    metrics = record["metrics"]
    assert set(metrics) == set(record["dense_metrics"])
    assert metrics["lm_eval/lrc_cloze_embedded/chance"] == 0.0 and "lm_eval/lrc_cloze_pydocs/acc" not in metrics
    assert metrics["lm_eval/lrc_ruin_names/chance"] == 0.25
    for task in ("lrc_cloze_embedded", "lrc_movie_recommendation", "lrc_ruin_names"):
        assert 0 <= metrics[f"lm_eval/{task}/acc_stderr"] <= 0.5
    assert {"lm_eval/mean_acc_above_chance", "lm_eval/mean_acc_above_chance_stderr"} <= set(metrics)


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
    diagnostics = record["diagnostics"]
    assert (diagnostics["statistics_cached"], diagnostics["statistics_computed"]) == ([], [])
    assert diagnostics["calibration_passes"] == 0  # no calibration forward at all
    assert record["metrics"]["ppl/embedded"] > 0


@pytest.mark.parametrize("args, message, recorded", [
    (["ratio=1.5"], "ratio=1.5 is outside (0, 1)", True),
    (["ratio=0"], "ratio=0 is outside (0, 1)", True),
    (["model=hf", "model.load.name_or_path=/no/such/model"], "model path '/no/such/model' does not exist", True),
    (["allocator=nosuch"], "Could not find 'allocator/nosuch'", False),  # Hydra stops before lrc.run starts
    (["calibration=textfile", "calibration.path=SHORT", "calibration.seqlen=512"],
     "shorter than one window of seqlen=512", True),
    (["+factorizer.bogus=1"], "bogus", True),
    (["benchmark=offline", "benchmark.zeroshot.tasks=[lrc_offline,no_such_task]"],
     "unknown lm-eval task(s) ['no_such_task']", True),
])
def test_bad_input_is_one_clear_line(args, message, recorded, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    args = [a.replace("SHORT", str(short)) for a in args]
    proc = cli([*TINY, *args], tmp_path / "run")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    record_path = tmp_path / "run" / "result.json"
    assert record_path.exists() == recorded
    if recorded:  # lrc.run started: the failure is on record, with the same message
        record = read_record(record_path)
        assert record["status"] == "failed" and message in record["error"]


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
    check_record(record, 0.4)
    errors = record["diagnostics"]["truncation_error"]
    assert len(errors) == 14 and all(e >= 0 for e in errors.values())
    added = record["diagnostics"]["added_params"]
    if factorizer == "feature_pca":  # bias compensation adds one bias per compressed matrix
        assert added == {name: shape[0] for name, shape in record["diagnostics"]["shapes"].items()}
    else:
        assert added == {}


SEARCH = ["trials=3", "allocator.validation.nsamples=2", "allocator.validation.seqlen=64"]
ALLOCATOR_ARGS = {"uniform": [], "energy": [], "mgaa": [], "bayes": [*SEARCH, "allocator.startup_trials=2"],
                  "ressvd_plc": SEARCH[1:], "asvd": ["allocator.validation.seqlen=64"],
                  "bolaco": [*SEARCH, "allocator.startup_trials=1"],
                  "bolaco_lrc": [*SEARCH, "allocator.startup_trials=1"],
                  "composite": [], "composite_search": ["allocator.search_trials=2", *SEARCH[1:]]}


@pytest.mark.parametrize("allocator", sorted(p.stem for p in (REPO / "conf" / "allocator").glob("*.yaml")))
def test_every_allocator_runs_end_to_end(allocator, tmp_path):
    record = run(compose([*TINY, f"allocator={allocator}", *ALLOCATOR_ARGS[allocator], "ratio=0.4"]), tmp_path)
    check_record(record, 0.4)
    params = record["params"]
    assert params["target_before"] * 0.6 >= params["target_after"]  # never over the budget
    if allocator == "bayes":
        assert [t["trial"] for t in record["trials"]] == [0, 1, 2]
        assert (tmp_path / "trials.csv").read_text().splitlines()[0].startswith("trial,")
        assert record["diagnostics"]["allocation"]["best_objective"] == min(t["objective"] for t in record["trials"])
    if allocator == "ressvd_plc":  # N R = 0.8: k = 1 or 2, the best kept; the first N - k blocks dense
        k = record["diagnostics"]["allocation"]["k"]
        assert [t["k"] for t in record["trials"]] == [1, 2]
        assert k == min(record["trials"], key=lambda t: (t["ppl"], t["k"]))["k"]
        shapes = record["diagnostics"]["shapes"]
        dense = {name for name, r in record["ranks"].items() if r * sum(shapes[name]) >= math.prod(shapes[name])}
        assert dense == {name for name in record["ranks"] if int(name.split(".")[2]) < 2 - k}  # none when k = 2
    if allocator == "mgaa":
        assert len(record["diagnostics"]["allocation"]["sublayer_cosine"]) == 4


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
    from lrc.config.resolvers import job_dirname

    assert job_dirname("a=1,calibration.path=/x/y.txt") == "a=1,calibration.path=_x_y.txt"
    long = job_dirname("k=" + "v" * 400)
    assert len(long.encode()) <= 200 and "/" not in long and long != job_dirname("k=" + "v" * 399)


def test_an_unwritable_cache_or_output_folder_is_one_clear_line(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    proc = cli([*TINY, f"cache_dir={blocker}/cache"], tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"lrc: error: cannot write {blocker}/cache" in proc.stderr
    record = read_record(tmp_path / "run" / "result.json")  # the run folder itself is fine: the failure is recorded
    assert record["status"] == "failed" and "cannot write" in record["error"]
    with pytest.raises(DataError, match=f"cannot write {blocker}/run"):
        run(compose([*TINY, f"cache_dir={tmp_path / 'cache'}"]), blocker / "run")
