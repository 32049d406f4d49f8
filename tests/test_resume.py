"""A search stopped mid-way resumes where it stopped: every plan it scored comes back from the
score memo (no model evaluation), and the result equals an uninterrupted search's."""

import copy

import pytest
import torch
from conftest import spec

from lrc import pipeline
from lrc.allocators.asvd_search import ASVDSensitivity
from lrc.allocators.bayes import Bayes
from lrc.allocators.ressvd_plc import ResSVDPLC
from lrc.compress.scoring import PlanScorer
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.errors import LrcError
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.factorizers.ressvd import ResSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.loading import LoadedModel

VALIDATION = {"nsamples": 2, "seqlen": 32, "batch_size": 2}
SEARCHES = {
    "bayes-gp": lambda: Bayes(n_trials=8, startup_trials=3, sampler="gp", seed=0, validation=VALIDATION),
    "bayes-tpe": lambda: Bayes(n_trials=8, startup_trials=3, sampler="tpe", seed=0, validation=VALIDATION),
    "ressvd_plc": lambda: ResSVDPLC(validation=VALIDATION),
    "asvd": lambda: ASVDSensitivity(validation=VALIDATION),
}


class Stopped(LrcError):
    """Stands for a preemption in the middle of a search."""


def search(tiny, cache, make_allocator, run_dir=None):
    loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
    calibration = Calibration(EmbeddedText(), nsamples=2, seqlen=32, validation=EmbeddedText("validation"))
    return pipeline.compress_and_evaluate(loaded, spec(SVDLLM(), make_allocator(), 0.4, calibration, [],
                                                       cache_dir=cache, measure_forward=False, run_dir=run_dir))


@pytest.mark.parametrize("name", SEARCHES)
def test_a_stopped_search_resumes_with_the_uninterrupted_result(name, tiny, tmp_path, monkeypatch):
    whole = search(tiny, tmp_path / "whole", SEARCHES[name])
    stop_after = len(whole.trials) // 2
    evaluate = PlanScorer.evaluate

    def evaluate_until_stopped(self, model):
        if sum(not row["memoised"] for row in self.trials) >= stop_after:
            raise Stopped("preempted")
        return evaluate(self, model)

    with monkeypatch.context() as patch:
        patch.setattr(PlanScorer, "evaluate", evaluate_until_stopped)
        with pytest.raises(Stopped):
            search(tiny, tmp_path / "resumed", SEARCHES[name])
    resumed = search(tiny, tmp_path / "resumed", SEARCHES[name])
    assert resumed.ranks == whole.ranks
    assert [row["objective"] for row in resumed.trials] == [row["objective"] for row in whole.trials]
    assert sum(row["memoised"] for row in resumed.trials) == stop_after  # what it scored before the stop
    assert not any(row["memoised"] for row in whole.trials)


def test_bayes_keeps_its_study_in_a_journal_in_the_run_folder(tiny, tmp_path, monkeypatch):
    """The study is an optuna JournalStorage file in the run folder; after a stop and a resume it
    holds exactly the uninterrupted search (the resumed attempt starts it afresh and replays)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from lrc.allocators.bayes import STUDY_FILE, STUDY_NAME

    whole = search(tiny, tmp_path / "whole", SEARCHES["bayes-gp"])  # no run folder: an in-memory study
    evaluate = PlanScorer.evaluate

    def evaluate_until_stopped(self, model):
        if sum(not row["memoised"] for row in self.trials) >= 3:
            raise Stopped("preempted")
        return evaluate(self, model)

    with monkeypatch.context() as patch:
        patch.setattr(PlanScorer, "evaluate", evaluate_until_stopped)
        with pytest.raises(Stopped):
            search(tiny, tmp_path / "cache", SEARCHES["bayes-gp"], run_dir=tmp_path / "run")
    resumed = search(tiny, tmp_path / "cache", SEARCHES["bayes-gp"], run_dir=tmp_path / "run")
    assert resumed.ranks == whole.ranks
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "run" / STUDY_FILE)))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    values = [t.value for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE])]
    assert values == [row["objective"] for row in whole.trials]


def test_decompositions_kept_on_disk_serve_the_next_run_exactly(tiny, tmp_path):
    """decomposition_cache: a sweep over ratios decomposes each matrix once; what comes back from
    disk gives exactly the model a fresh decomposition gives."""
    from lrc.allocators.uniform import Uniform
    from lrc.compress.layerwise import LayerwiseOptions
    from lrc.eval.perplexity import PerplexityBenchmark
    from lrc.pipeline import RunSpec, Settings, compress_and_evaluate

    calibration = Calibration(EmbeddedText(), nsamples=2, seqlen=32)
    bench = [PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=64, max_windows=4)]

    def run(ratio, cache, stored, layerwise=False):
        loaded = LoadedModel(copy.deepcopy(tiny.model), tiny.tokenizer, tiny.identity)
        settings = Settings(cache_dir=cache, measure_forward=False, decomposition_cache=stored,
                            layerwise=LayerwiseOptions(enabled=layerwise))
        return compress_and_evaluate(loaded, RunSpec(pipeline.Method(SVDLLM(), Uniform()), ratio, calibration, bench,
                                                     settings))

    first, second = run(0.2, tmp_path / "a", True), run(0.4, tmp_path / "a", True)
    fresh = run(0.4, tmp_path / "b", False)
    low_rank = len(second.ranks)  # tiny-random: every matrix is factorized at these ratios
    assert (first.diagnostics["decompositions_computed"], first.diagnostics["decompositions_reused"]) == (low_rank, 0)
    assert (second.diagnostics["decompositions_computed"], second.diagnostics["decompositions_reused"]) == (0, low_rank)
    assert second.metrics == fresh.metrics and second.diagnostics["truncation_error"] == fresh.diagnostics[
        "truncation_error"]
    assert "decompositions_reused" not in fresh.diagnostics
    layer = run(0.4, tmp_path / "a", True, layerwise=True)  # per-block statistics keys: its own entries
    assert layer.diagnostics["decompositions_computed"] == low_rank and layer.metrics == pytest.approx(fresh.metrics)


@pytest.mark.parametrize("make", [lambda: ResSVD(beta=0.2), lambda: FeaturePCA(pooled=False), lambda: SVDLLM()])
def test_a_decomposition_read_back_from_disk_truncates_exactly_as_computed(make, tmp_path, rng):
    """Every kind of decomposition (ResSVD's residual stage, Bolaco's bias offset) comes back whole."""
    from lrc.compress.decompositions import DecompositionCache
    from tests.test_factorizers import correlated_inputs, stats_of

    W = torch.randn(20, 28, generator=rng, dtype=torch.float64)
    stats = stats_of(correlated_inputs(28, 200, rng))
    factorizer = make()
    written = DecompositionCache(tmp_path).get_or_compute({"k": 1}, factorizer.describe(), "w",
                                                         lambda: factorizer.decompose(W, stats, max_rank=9))
    cache = DecompositionCache(tmp_path)
    read = cache.get_or_compute({"k": 1}, factorizer.describe(), "w", lambda: pytest.fail("recomputed"))
    assert cache.reused == 1 and type(read) is type(written) and read.max_rank == 9
    for rank in (3, 9):
        for got, want in zip(read.factors(rank), written.factors(rank), strict=True):
            assert torch.equal(got, want)
        assert read.truncation_error(rank) == written.truncation_error(rank)
        assert (read.bias_correction(rank) is None) == (written.bias_correction(rank) is None)
