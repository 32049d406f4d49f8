"""The `method` presets: each published method composes and runs end to end on tiny-random."""

import pytest
from conftest import CONF, compose
from test_run import TINY

from lrc.allocators.keep_dense import KeepDense
from lrc.allocators.mgaa import MGAA
from lrc.budget import Budget, check_plan
from lrc.config.build import run_spec
from lrc.factorizers.svdllm import SVDLLM
from lrc.report import method, rows
from lrc.run import run

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SMALL_SEARCH = ["trials=4", "allocator.validation.nsamples=2", "allocator.validation.seqlen=64",
                "allocator.validation.batch_size=2"]
ARGS = {"asvd": ["allocator.validation.nsamples=1", "allocator.validation.seqlen=64"],
        "bolaco": [*SMALL_SEARCH, "allocator.startup_trials=1"],
        "bolaco_lrc": [*SMALL_SEARCH, "allocator.startup_trials=2"],
        "ressvd": ["allocator.validation.nsamples=2", "allocator.validation.seqlen=64"],
        "composite": ["allocator.search_trials=2", *SMALL_SEARCH[1:]],
        "composite_lora": ["allocator.search_trials=2", *SMALL_SEARCH[1:], "finetune.steps=2", "finetune.nsamples=2",
                           "finetune.seqlen=32", "finetune.batch_size=1"],
        "composite_mixed": ["allocator.search_trials=2", *SMALL_SEARCH[1:]]}
EXPECTED = {"svd": ("uniform", "svd"), "asvd": ("asvd", "asvd"), "fwsvd": ("uniform", "fwsvd"),
            "svdllm": ("uniform", "svdllm"), "bolaco": ("bolaco", "feature_pca"),
            "bolaco_lrc": ("bolaco_lrc", "feature_pca"), "mgaa": ("mgaa", "svdllm"), "ressvd": ("ressvd_plc", "ressvd"),
            "composite": ("composite_search", "svdllm_robust"), "composite_lora": ("composite_search", "svdllm_robust"),
            "composite_mixed": ("composite_search", "svdllm_robust"), "mgaa_sequential": ("mgaa", "svdllm")}


def test_the_published_methods_are_all_there():
    assert set(EXPECTED) <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_runs_end_to_end(name, tmp_path):
    record = run(compose([*TINY, f"method={name}", "ratio=0.3", *ARGS.get(name, [])]), tmp_path)
    assert record["status"] == "done"
    cfg = record["config"]
    assert cfg["method_name"] == name and method(record) == name
    assert (cfg["allocator"]["name"], cfg["factorizer"]["name"]) == EXPECTED[name]
    shapes = {name_: tuple(shape) for name_, shape in record["diagnostics"]["shapes"].items()}
    check_plan(record["ranks"], Budget(shapes, 0.3, extra=record["diagnostics"]["added_params"]))
    header, table = rows([record])
    assert header[0] == "method" and table[0][0] == name


def test_bolaco_keeps_v_dense_counts_its_biases_and_reports_both_removals(tmp_path):
    record = run(compose([*TINY, "method=bolaco", "ratio=0.3", *ARGS["bolaco"]]), tmp_path)
    shapes = record["diagnostics"]["shapes"]
    assert all(rank == min(shapes[n]) for n, rank in record["ranks"].items() if n.endswith("v_proj"))
    assert all(rank < min(shapes[n]) for n, rank in record["ranks"].items() if n.endswith("q_proj"))
    # feature_pca adds an output-mean bias to every factorized linear: part of the stored parameters
    params = record["params"]
    assert params["target_after"] <= (1 - 0.3) * params["target_before"]
    assert record["diagnostics"]["added_params"]["model.layers.0.self_attn.q_proj"] == 64
    allocation = record["diagnostics"]["allocation"]
    assert allocation["budget"] == "window" and allocation["keep_dense"] == ["v_proj"]
    # the window holds for the continuous group ratios of the whole target set (v counted, kept dense)
    best = allocation["best_ratios"]
    params = {m: 0 for m in best}
    for name, shape in shapes.items():
        kind = name.rsplit(".", 1)[-1].removesuffix("_proj")
        group = "q+k" if kind in ("q", "k") else kind
        if group in params:
            params[group] += shape[0] * shape[1]
    continuous = sum(best[g] * p for g, p in params.items()) / sum(s[0] * s[1] for s in shapes.values())
    assert allocation["best_trial_removed_continuous"] == pytest.approx(continuous)
    assert 0.3 - 1e-9 <= continuous <= 0.4 + 1e-9
    scored = [t for t in record["trials"] if not t.get("final")]
    assert len(scored) == 4 and record["trials"][-1]["final"] == 1 and record["trials"][-1]["trial"] == 4


@pytest.mark.parametrize("name", METHODS)
def test_command_line_overrides_go_on_top_of_a_method(name):
    """Any allocator or factorizer replaces the preset's, and what is built is exactly that one."""
    job = run_spec(compose([*TINY, f"method={name}", "allocator=mgaa", "factorizer=svdllm"]))
    plain = run_spec(compose([*TINY, "allocator=mgaa", "factorizer=svdllm"]))
    # nothing of the preset leaks
    assert type(job.method.allocator) is MGAA and vars(job.method.allocator) == vars(plain.method.allocator)
    assert type(job.method.factorizer) is SVDLLM and vars(job.method.factorizer) == vars(plain.method.factorizer)


def test_options_go_on_top_of_a_method():
    job = run_spec(compose([*TINY, "method=bolaco", "allocator.n_trials=7", "allocator.validation.objective=log"]))
    assert isinstance(job.method.allocator, KeepDense) and job.method.allocator.kinds == ("v_proj",)
    assert job.method.allocator.inner.n_trials == 7 and job.method.allocator.validation.objective == "log"
    assert job.method.allocator.inner.budget == "window" and job.method.allocator.inner.rank_multiple == 8


def test_mgaa_sequential_updates_every_pair_without_raising_its_error(tmp_path):
    record = run(compose([*TINY, "method=mgaa_sequential", "ratio=0.3"]), tmp_path)
    assert record["config"]["layerwise"]["sequential_update"] and record["config"]["layerwise"]["update_target"] == "local"
    errors = record["diagnostics"]["sequential_update"]
    assert set(errors) == {n for n, r in record["ranks"].items() if r < min(record["diagnostics"]["shapes"][n])}
    assert all(after <= before * (1 + 1e-9) for before, after in errors.values())


def test_composite_mixed_is_the_composite_calibrated_on_both_texts():
    cfg = compose([*TINY, "method=composite_mixed", "ratio=0.3"])
    assert cfg.calibration.name == "mixed" and set(cfg.calibration.source.components) == {"embedded", "text"}
    assert cfg.calibration.path == "/usr/share/common-licenses"
    composite = compose([*TINY, "method=composite", "ratio=0.3"])
    assert cfg.allocator == composite.allocator and cfg.factorizer == composite.factorizer
