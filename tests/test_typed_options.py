"""Wrongly typed options end in one line naming the key and the type it needs (the target's
signature is its structured config), before anything is built or loaded."""

import re

import pytest
from conftest import compose

from lrc.config.build import run_spec
from lrc.config.schema import check_options, schema_for
from lrc.errors import ConfigError
from lrc.factorizers.svdllm import SVDLLM

TINY = ["model=tiny-random", "logger=none"]


@pytest.mark.parametrize("overrides, message", [
    (["factorizer.damping=abc"], "factorizer=svdllm: damping='abc' is not a number"),
    (["+factorizer.dampen=0.1"], "factorizer=svdllm: unknown option 'dampen'"),
    (["allocator=mgaa", "allocator.residual=maybe"], "allocator=mgaa: residual='maybe' is not true or false"),
    (["allocator=bayes", "trials=many"], "config: trials='many' is not an integer"),
    (["calibration.nsamples=many"], "calibration: nsamples='many' is not an integer"),
    (["benchmark.perplexity.embedded.max_windows=all"], "max_windows='all' is not an integer or null"),
    (["ratio=abc"], "config: ratio='abc' is not a number"),
    (["save=maybe"], "config: save='maybe' is not true or false"),
    (["statistics.write=sometimes"], "statistics: write='sometimes' is not true or false"),
    (["statistics.precision=float16"], "statistics.precision='float16' is not one of"),
    (["statistics.codec=gzip"], "statistics.codec='gzip' is not one of"),
    (["factorizer.route=qr"], "route='qr' is not one of"),
])
def test_wrong_type_names_the_key_and_the_type(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_spec(compose([*TINY, *overrides]))


def test_right_types_pass_and_are_left_to_the_constructor():
    check_options(SVDLLM, {"damping": 1, "whitening": "cholesky"}, "factorizer=svdllm")  # an int is a number
    with pytest.raises(ConfigError, match="damping=-1"):  # ranges stay lrc's own checks
        run_spec(compose([*TINY, "factorizer.damping=-1"]))


def test_schema_follows_the_signature():
    fields = {f.name: f.type for f in schema_for(SVDLLM).__dataclass_fields__.values()}
    assert fields["damping"] is float and fields["compute_dtype"] is str
    assert schema_for(lambda **anything: None) is None  # takes anything: nothing to check


def test_a_target_that_does_not_exist_is_one_line():
    with pytest.raises(ConfigError, match=r"factorizer=svdllm: _target_='lrc.factorizers.nowhere.SVD' names nothing"):
        run_spec(compose([*TINY, "factorizer._target_=lrc.factorizers.nowhere.SVD"]))


def test_a_wrong_type_inside_a_list_names_the_option():
    with pytest.raises(ConfigError, match=r"allocator=ressvd_plc: candidates=\[2, 'abc'\] is not a list of integers"):
        check_options("lrc.allocators.ressvd_plc.ResSVDPLC", {"candidates": [2, "abc"]}, "allocator=ressvd_plc")


@pytest.mark.parametrize("group, option, expected",
                         [("calibration", "c4", None), ("benchmark", "ptb", "penn_treebank")])
def test_a_dataset_keeps_its_configuration_name(group, option, expected):
    """``name`` labels a group's choice, but a dataset's ``name`` is its configuration: C4 has none,
    PTB's is not WikiText's default."""
    from lrc.config.build import build_benchmarks, build_calibration

    cfg = compose([*TINY, f"{group}={option}"])
    source = build_calibration(cfg).source if group == "calibration" else build_benchmarks(cfg)[0].source
    assert source.name == expected


def test_records_of_moved_modules_still_match_and_rebuild():
    """Records written before the package was split name the old modules; they still resume and export."""
    from lrc.config.build import current_targets, from_record

    old = {"calibration": {"source": {"_target_": "lrc.calibration.EmbeddedText", "split": "calibration"}},
           "logger": {"_target_": "lrc.tracking.WandbTracker"}, "ratio": 0.2}
    assert current_targets(old) == {
        "calibration": {"source": {"_target_": "lrc.data.sources.EmbeddedText", "split": "calibration"}},
        "logger": {"_target_": "lrc.results.tracking.WandbTracker"}, "ratio": 0.2}
    assert from_record(old).calibration.source._target_ == "lrc.data.sources.EmbeddedText"


def test_records_from_before_an_option_existed_rebuild_what_they_ran():
    """Exporting an old record rebuilds its model: float64 statistics and the SVD route, as it ran then."""
    from lrc.config.build import from_record

    old = from_record({"factorizer": {"_target_": "lrc.factorizers.svdllm.SVDLLM"}, "ratio": 0.2})
    assert old.statistics.precision == "float64" and old.factorizer.route == "svd"
    new = from_record({"factorizer": {"_target_": "lrc.factorizers.svdllm.SVDLLM", "route": "eigh"},
                       "statistics": {"precision": "float32", "write": True}, "ratio": 0.2})
    assert new.statistics.precision == "float32" and new.factorizer.route == "eigh"
