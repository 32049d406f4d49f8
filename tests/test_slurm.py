"""Sweeps on a real single-node SLURM cluster (scripts/local_slurm.py) through submitit.

Needs root and Debian's slurm packages; the fixture installs them with apt when they are
missing and skips with the reason when it cannot (no root, no apt-get).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from lrc.results.records import read_record

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "scripts" / "local_slurm.py"
CONF = Path(os.environ.get("LRC_SLURM_DIR", "/tmp/lrc-slurm")) / "etc" / "slurm.conf"
TINY = ["model=tiny-random", "device=cpu", "logger=none", "launcher=slurm_local", "calibration.nsamples=4",
        "calibration.seqlen=64", "benchmark.perplexity.embedded.seqlen=64",
        "benchmark.perplexity.embedded.max_windows=20"]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root")
    if not shutil.which("slurmctld") or not shutil.which("mariadbd"):
        if not shutil.which("apt-get"):
            pytest.skip("slurm is not installed and there is no apt-get to install it")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run([sys.executable, str(SCRIPT), "install"], check=True, timeout=900, capture_output=True)
    subprocess.run([sys.executable, str(SCRIPT), "start"], check=True, timeout=300)
    yield {**os.environ, "SLURM_CONF": str(CONF)}
    subprocess.run([sys.executable, str(SCRIPT), "stop"], timeout=120)


def sweep(env, sweep_dir, *args, background=False, timeout=600):
    cmd = [sys.executable, "-m", "lrc.run", "-m", *TINY, *args, f"hydra.sweep.dir={sweep_dir}"]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def job_logs(sweep_dir: Path) -> str:
    return "".join(p.read_text() for p in sweep_dir.glob("*/run.log"))


def test_sweep_runs_one_slurm_job_per_run_and_computes_statistics_once(cluster, tmp_path):
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    proc = sweep(env, tmp_path / "sweep", "allocator=uniform,mgaa", "ratio=0.2,0.4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [read_record(p) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert len(records) == 4 and all(r["status"] == "done" for r in records)
    job_ids = {r["environment"]["SLURM_JOB_ID"] for r in records}
    assert len(job_ids) == 4  # one SLURM job each
    logs = job_logs(tmp_path / "sweep")
    assert logs.count("statistics: computed gram") == 1  # shared by the whole sweep
    assert logs.count("statistics: computed cosine") == 1
    deadline = time.monotonic() + 60
    while True:  # slurmdbd records a job's end a moment after it leaves the queue
        accounting = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                                    env=env, capture_output=True, text=True).stdout
        if accounting.count("COMPLETED") == 4 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert accounting.count("COMPLETED") == 4, accounting


def test_gpu_job_sees_its_gpu(cluster, tmp_path):
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    proc = sweep(env, tmp_path / "sweep", "hydra.launcher.gpus_per_node=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = read_record(next((tmp_path / "sweep").glob("*/result.json")))
    assert record["status"] == "done"
    assert record["environment"]["CUDA_VISIBLE_DEVICES"] == "0"  # a fake GPU: the run itself is on CPU


def test_cancelled_job_is_recorded_and_rerun_alone(cluster, tmp_path):
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    slow = ["allocator=uniform,bayes", "trials=60"]  # the GP search keeps the bayes job busy for a while
    proc = sweep(env, tmp_path / "sweep", *slow, background=True)
    deadline = time.monotonic() + 240
    bayes_job = None
    while bayes_job is None and time.monotonic() < deadline:  # the bayes job, once it is searching
        for log in (tmp_path / "sweep").glob("*allocator=bayes*/run.log"):
            if "bayes trial 5/" in log.read_text():
                out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=env, capture_output=True, text=True)
                running = [line.split()[0] for line in out.stdout.splitlines() if "RUNNING" in line]
                bayes_job = next((j for j in running if j.endswith("_1")), None)
        time.sleep(0.5)
    assert bayes_job, "the bayes job never started searching"
    subprocess.run(["scancel", bayes_job], env=env, check=True)
    out, _ = proc.communicate(timeout=300)
    records = {p.parent.name: read_record(p) for p in (tmp_path / "sweep").glob("*/result.json")}
    assert [r["status"] for name, r in records.items() if "uniform" in name] == ["done"]  # the other job finished
    failed = [r for name, r in records.items() if "bayes" in name]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "cancelled by SIGTERM" in failed[0]["error"]

    again = sweep(env, tmp_path / "sweep", *slow)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    logs = job_logs(tmp_path / "sweep")
    assert logs.count("already done, skipped") == 1  # only the cancelled run was computed again
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("*/result.json")]
    assert statuses == ["done", "done"]


def seconds_saved(record: dict) -> float:
    """Scoring time the memo saved: the memoised trials at the mean time of a freshly scored one."""
    fresh = [row["seconds"] for row in record["trials"] if not row["memoised"]]
    return sum(bool(row["memoised"]) for row in record["trials"]) * sum(fresh) / max(len(fresh), 1)


def running_job(env, sweep_dir: Path, pattern: str, marker: str, seconds: float = 240) -> str | None:
    """The SLURM id of the running job whose run.log (``pattern``) shows ``marker``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for log in sweep_dir.glob(pattern):
            if marker in log.read_text():
                out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True)
                running = [line.split()[0] for line in out.stdout.splitlines() if "RUNNING" in line]
                if running:
                    return running[0]
        time.sleep(0.5)
    return None


@pytest.mark.slow  # SLURM holds a requeued job about two minutes before it starts again
def test_preempted_job_is_requeued_and_resumes_its_search(cluster, tmp_path):
    """USR2 (what SLURM sends on preemption or before a time limit): submitit requeues the job,
    SIGTERM during the requeue does not fail the run, and the requeued job resumes the search
    with every plan scored before the signal coming back from the score memo."""
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    proc = sweep(env, tmp_path / "sweep", "allocator=bayes", "trials=30", background=True)
    job = running_job(env, tmp_path / "sweep", "*/run.log", "bayes trial 6/")
    assert job, "the bayes job never started searching"
    subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    [path] = (tmp_path / "sweep").glob("*/result.json")
    record = read_record(path)
    assert record["status"] == "done", record.get("error")
    memoised = sum(bool(row["memoised"]) for row in record["trials"])
    assert memoised >= 6 and len(record["trials"]) >= 30  # the trials before the signal were not scored again
    states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job.split("_")[0], "-o", "JobID,State"],
                            env=env, capture_output=True, text=True).stdout.split()
    assert any(s.endswith("|REQUEUED") for s in states) and any(s.endswith("|COMPLETED") for s in states), states
    log = (path.parent / "run.log").read_text()
    assert "requeueing the job" in log and log.count("bayes trial 1/") == 2  # two attempts, one folder
    print(f"preempted: sacct {states}; {len(record['trials'])} trials, {memoised} from the memo, "
          f"about {seconds_saved(record):.1f} s of scoring not repeated")


@pytest.mark.slow  # SLURM holds a requeued job about two minutes before it starts again
def test_job_past_its_time_limit_is_requeued_until_its_search_is_done(cluster, tmp_path):
    """A one-minute limit with USR2 30 s before it: every attempt scores what it can, is requeued,
    and the next one replays those plans from the memo and goes on, until the run is done.
    Timing-bound: 120 trials took one requeue on this 2-core machine when idle; under load each
    attempt gets less done and the test can need more requeues (about 2.5 minutes each)."""
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    proc = sweep(env, tmp_path / "sweep", "allocator=bayes", "trials=120", "hydra.launcher.timeout_min=1",
                 "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=8", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = (tmp_path / "sweep").glob("*/result.json")
    record = read_record(path)
    assert record["status"] == "done", record.get("error")
    job = record["environment"]["SLURM_JOB_ID"]
    states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,Elapsed"],
                            env=env, capture_output=True, text=True).stdout.split()
    requeued = [s for s in states if "|REQUEUED|" in s]
    if not requeued:  # this machine searched faster than the limit: nothing was interrupted
        pytest.skip(f"the search finished before its time limit ({states}); nothing to requeue")
    memoised = sum(bool(row["memoised"]) for row in record["trials"])
    assert 0 < memoised < len(record["trials"]) == 120
    print(f"time limit: sacct {states}; {len(record['trials'])} trials, {memoised} from the memo, "
          f"about {seconds_saved(record):.1f} s of scoring not repeated")


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one time."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


@pytest.mark.slow  # 24 jobs through a 4-wide array on 2 cores: a few minutes
def test_a_sweep_of_24_jobs_under_load(cluster, tmp_path):
    """24 jobs, at most 4 running at once: all finish, each statistics kind is computed once for
    the whole sweep, and submitting the finished sweep again does no work."""
    from datetime import datetime

    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    grid = ["allocator=uniform,mgaa,energy,ressvd_plc", "factorizer=svdllm,svd,asvd", "ratio=0.2,0.4",
            "hydra.launcher.array_parallelism=4"]
    start = time.monotonic()
    proc = sweep(env, tmp_path / "sweep", *grid)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [read_record(p) for p in (tmp_path / "sweep").glob("*/result.json")]
    assert len(records) == 24 and all(r["status"] == "done" for r in records)
    logs = job_logs(tmp_path / "sweep")
    computed = {kind: logs.count(f"statistics: computed {kind},") for kind in ("gram", "mean_abs", "cosine")}
    assert computed == {"gram": 1, "mean_abs": 1, "cosine": 1}, computed
    array = records[0]["environment"]["SLURM_ARRAY_JOB_ID"]
    rows = subprocess.run(["sacct", "-X", "-n", "-P", "-j", array, "-o", "JobID,Start,End,State"], env=env,
                          capture_output=True, text=True).stdout.split()
    spans = [tuple(datetime.fromisoformat(t).timestamp() for t in row.split("|")[1:3]) for row in rows]
    assert len(spans) == 24 and 1 < overlap(spans) <= 4, rows
    again = sweep(env, tmp_path / "sweep", *grid)
    assert again.returncode == 0 and job_logs(tmp_path / "sweep").count("already done, skipped") == 24
    print(f"load sweep: 24 jobs in {wall:.0f} s, at most {overlap(spans)} running at once, statistics computed "
          f"{computed}; re-submitted: 24 skipped")


HOLDER = """
import sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from lrc.config.build import load_model, run_spec
from lrc.files import cache_key
from lrc.model.adapters import find_targets
from lrc.stats.cache import StatisticsCache, statistics_key

conf, cache, holding, *overrides = sys.argv[1:]
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose(config_name="config", overrides=overrides)
spec = run_spec(cfg)
loaded, _ = load_model(cfg, spec)
stats = StatisticsCache(Path(cache), spec.settings.statistics)
base = statistics_key({"model": loaded.identity, "calibration": spec.calibration.describe(),
                       "storage": stats.storage.tag}, find_targets(loaded.model), mode="whole-model")

def compute(missing):  # the sweep's own lock is held now; a write is begun and never finished
    final = stats.path(cache_key({**base, "kind": "gram"}))
    (final.parent / f".{final.name}.tmp-killed").write_bytes(b"half a file")
    Path(holding).write_text(f"{final}\\n{stats.root / (cache_key(base) + '.lock')}")
    time.sleep(600)

stats.get_or_compute(base, frozenset({"gram"}), compute)
"""


def test_a_job_killed_while_holding_the_statistics_lock_blocks_no_one(cluster, tmp_path):
    """A SLURM job SIGKILLed (scancel --signal=KILL) while it holds a statistics lock: the lock dies
    with it, the sweep after it computes and caches the statistics itself and reads no partial file."""
    env = {**cluster, "LRC_CACHE_DIR": str(tmp_path / "cache")}
    script, holding = tmp_path / "holder.py", tmp_path / "holding"
    script.write_text(HOLDER)
    overrides = " ".join(a for a in TINY if not a.startswith("launcher="))
    command = f"{sys.executable} {script} {REPO / 'conf'} {tmp_path / 'cache'} {holding} {overrides}"
    submitted = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-c", "1", f"--chdir={REPO}",
                                f"--output={tmp_path}/holder.log", "--wrap", command],
                               env=env, capture_output=True, text=True, check=True)
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not holding.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert holding.exists(), (tmp_path / "holder.log").read_text() if (tmp_path / "holder.log").exists() else job
    final, lock = holding.read_text().splitlines()
    from filelock import FileLock, Timeout

    with pytest.raises(Timeout):  # the holder really holds the lock the sweep will need
        FileLock(lock).acquire(timeout=0)
    subprocess.run(["scancel", "--signal=KILL", job], env=env, check=True)
    for _ in range(60):  # until SLURM has it ended
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], env=env, capture_output=True,
                               text=True).stdout.strip()
        if state and state not in ("RUNNING", "PENDING"):
            break
        time.sleep(1)
    assert state.startswith(("CANCELLED", "FAILED")), state
    start = time.monotonic()
    proc = sweep(env, tmp_path / "sweep", "allocator=uniform")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [record] = [read_record(p) for p in (tmp_path / "sweep").glob("*/result.json")]
    assert record["status"] == "done" and record["diagnostics"]["statistics_computed"] == ["gram"]
    assert f"computed gram, cached at {final}" in job_logs(tmp_path / "sweep")  # the very file the holder began
    assert list((tmp_path / "cache" / "stats").glob(".*.tmp-killed"))  # the killed job's half-written file was
    # there all along under a temporary name; the run read only the complete file it wrote itself
    print(f"killed lock holder: job {job} {state}; the next sweep computed gram itself in "
          f"{time.monotonic() - start:.0f} s")
