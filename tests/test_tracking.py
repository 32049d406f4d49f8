"""W&B logging with the real client, offline: the run's transaction log holds what we logged."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import compose

from lrc.run import run

TINY = ["model=tiny-random", "device=cpu", "calibration.nsamples=2", "calibration.seqlen=64",
        "benchmark.perplexity.embedded.seqlen=64", "benchmark.perplexity.embedded.max_windows=4"]


def records(run_dir: Path) -> list[dict]:
    """The offline run's records, decoded by the W&B CLI (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_wandb_offline_run_logs_config_metrics_and_rank_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(compose([*TINY, "logger=wandb", "ratio=0.3"]), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    logged = records(runs[0])
    history = [r["history"]["item"] for r in logged if r.get("type") == "history"]
    metrics = next(h for h in history if "ppl/embedded" in h)
    assert metrics["ppl/embedded"] == record["metrics"]["ppl/embedded"]
    assert metrics["dense/ppl/embedded"] == record["dense_metrics"]["ppl/embedded"]
    assert metrics["removed_fraction"] == record["params"]["removed_fraction"]
    # the rank plan table: one row per target matrix, ranks as in result.json
    table_files = list((runs[0] / "files" / "media" / "table").glob("rank_plan_*.table.json"))
    assert len(table_files) == 1
    table = json.loads(table_files[0].read_text())
    module, rank = table["columns"].index("module"), table["columns"].index("rank")
    assert {row[module]: row[rank] for row in table["data"]} == record["ranks"]
    config = next(r for r in logged if r.get("type") == "run")["run"]["config"]["update"]
    config.pop("_wandb", None)  # W&B's own entry
    assert config == record["config"] and config["ratio"] == 0.3  # the config travels with the run, exactly
    images = list((runs[0] / "files" / "media" / "images").glob("ranks_per_layer_*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 10_000  # the per-layer rank plot


def test_wandb_offline_run_logs_every_search_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(compose([*TINY, "logger=wandb", "ratio=0.4", "allocator=bayes", "trials=3",
                          "allocator.startup_trials=2", "allocator.validation.nsamples=2",
                          "allocator.validation.seqlen=64"]), tmp_path)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    history = [r["history"]["item"] for r in records(run_dir) if r.get("type") == "history"]
    trials = [h for h in history if "trial/objective" in h]
    assert [t["trial/trial"] for t in trials] == [0, 1, 2]
    assert [t["trial/objective"] for t in trials] == [t["objective"] for t in record["trials"]]
    assert "trial/ratio/q+k" in trials[0]
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("trials_*.table.json")).read_text())
    assert len(table["data"]) == 3 and "objective" in table["columns"]


def test_sweep_runs_share_a_wandb_group_and_are_named_by_overrides(tmp_path):
    from conftest import REPO

    env = {**__import__("os").environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "lrc.run", "-m", *TINY, "logger=wandb", "ratio=0.2,0.4",
                           f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups, names = set(), set()
    for run_dir in (tmp_path / "sweep").glob("[0-9]*/wandb/offline-run-*"):  # the jobs (not the report)
        run_record = next(r for r in records(run_dir) if r.get("type") == "run")["run"]
        groups.add(run_record.get("run_group"))
        names.add(run_record.get("display_name"))
    assert groups == {str(tmp_path / "sweep")}
    assert len(names) == 2 and {n.rsplit(",", 1)[-1] for n in names} == {"ratio=0.2", "ratio=0.4"}
    assert all("model=tiny-random" in n for n in names)  # the run name is the job's overrides

    # when the sweep ended, its comparison was written next to it and logged in its group
    report = tmp_path / "sweep" / "report"
    lines = (report / "report.md").read_text().splitlines()
    assert len(lines) == 4 and all("| done |" in line for line in lines[2:])
    assert {line.split(" | ")[3] for line in lines[2:]} == {"0.2", "0.4"}  # the ratio column
    assert (report / "ppl_embedded_vs_ratio.png").stat().st_size > 0
    report_run = next(report.glob("wandb/offline-run-*"))
    run_record = next(r for r in records(report_run) if r.get("type") == "run")["run"]
    assert run_record["run_group"] == str(tmp_path / "sweep") and "sweep-report" in run_record["tags"]
    table = json.loads(next((report_run / "files" / "media" / "table").glob("comparison_*.table.json")).read_text())
    assert len(table["data"]) == 2 and table["columns"][:3] == ["method", "allocator", "factorizer"]

    # a re-run sweep skips its finished runs and reports again
    again = subprocess.run([sys.executable, "-m", "lrc.run", "-m", *TINY, "logger=wandb", "ratio=0.2,0.4",
                            f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") == 2, again.stdout[-2000:]
    assert len(list(report.glob("wandb/offline-run-*"))) == 2


def test_wandb_gets_the_asvd_sensitivity_table_and_the_method_name(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(compose([*TINY, "logger=wandb", "ratio=0.3", "method=asvd", "allocator.validation.seqlen=64"]),
                 tmp_path)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("asvd_sensitivity_*.table.json"))
                       .read_text())
    sensitivity = record["diagnostics"]["allocation"]["sensitivity"]
    assert len(table["data"]) == len(sensitivity) == 14
    row = table["data"][0]
    assert row[1:7] == [sensitivity[row[0]][c] for c in ("0.4", "0.5", "0.6", "0.7", "0.8", "0.9")]
    config = next(r for r in records(run_dir) if r.get("type") == "run")["run"]["config"]["update"]
    assert config["method_name"] == record["config"]["method_name"] == "asvd"


def test_wandb_logs_bolacos_search_with_its_final_fitted_trial(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(compose([*TINY, "logger=wandb", "ratio=0.3", "method=bolaco", "trials=3", "allocator.startup_trials=1",
                          "allocator.validation.nsamples=2", "allocator.validation.seqlen=64"]), tmp_path)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    table = json.loads(next((run_dir / "files" / "media" / "table").glob("trials_*.table.json")).read_text())
    trial, final = table["columns"].index("trial"), table["columns"].index("final")
    assert [row[trial] for row in table["data"]] == [0, 1, 2, 3] == [t["trial"] for t in record["trials"]]
    assert table["data"][-1][final] == 1


def test_a_run_folder_keeps_one_wandb_run_across_requeues(tmp_path, monkeypatch):
    """A requeued (or re-run) job resumes the W&B run of its folder instead of starting another."""
    from lrc.results.tracking import WandbTracker, run_id

    same = [WandbTracker(tmp_path / "a", {}).settings for _ in range(2)]
    assert same[0]["id"] == same[1]["id"] == run_id(tmp_path / "a") != run_id(tmp_path / "b")
    assert same[0]["resume"] == "allow"
    monkeypatch.setenv("WANDB_MODE", "offline")
    for _ in range(2):  # the second attempt at the same folder
        run(compose([*TINY, "logger=wandb", "force=true"]), tmp_path / "a")
    attempts = sorted((tmp_path / "a" / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(p.name.endswith(run_id(tmp_path / "a")) for p in attempts)
