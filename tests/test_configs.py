"""Every config in conf/ composes, and every node with a _target_ instantiates or binds."""

import dataclasses
import inspect
import json
import re

import pytest
import torch
from conftest import CONF, REPO, compose
from hydra.utils import get_class, get_method
from omegaconf import OmegaConf

from lrc.allocators.base import Validation
from lrc.allocators.keep_dense import KeepDense
from lrc.config.build import build, build_allocator, build_benchmarks, build_calibration
from lrc.data.sources import EmbeddedText
from lrc.errors import DataError

GROUPS = ["model", "calibration", "allocator", "factorizer", "benchmark", "logger"]
REQUIRED = {("calibration", "textfile"): ["calibration.path=/tmp/x.txt"],
            ("calibration", "mixed"): ["calibration.path=/tmp/x.txt"],
            ("benchmark", "textfile"): ["benchmark.path=/tmp/x.txt"],
            ("model", "hf"): ["model.load.name_or_path=Qwen/Qwen2.5-0.5B"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    assert all(options(g) for g in GROUPS)


def targets_in(node, path=""):
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from targets_in(node[key], f"{path}.{key}" if path else str(key))


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_config_composes_and_targets_bind(group, option):
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    OmegaConf.to_container(cfg[group], resolve=group != "logger")  # every interpolation resolves
    for path, node in targets_in(cfg[group], group):
        target = get_method(node._target_)
        consumed = {"name", "keep_dense"} if path == "allocator" else {"name"}  # read by lrc.run, not passed on
        kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k not in consumed}
        if path in ("model", "calibration.source", "benchmark") or path.endswith(".source"):
            kwargs = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v  # in place:
                      for k, v in kwargs.items()}  # interpolations resolve against the whole config
        signature = inspect.signature(target)
        # every option is a real parameter (a _partial_ node gets the rest at run time)
        (signature.bind_partial if node.get("_partial_") else signature.bind)(**kwargs)


@pytest.mark.parametrize("option", options("factorizer"))
def test_factorizers_instantiate(option):
    cfg = compose([f"factorizer={option}", "factorizer.compute_dtype=float32"])  # a non-default value
    fac = build(cfg.factorizer, "factorizer")
    assert type(fac) is get_class(cfg.factorizer._target_)
    assert fac.compute_dtype is torch.float32
    held = {**vars(fac), **vars(fac.whitener)} if option == "ressvd" else vars(fac)  # ResSVD's SVD-LLM whitens
    options = {k: v for k, v in cfg.factorizer.items() if k not in ("name", "_target_", "compute_dtype")}
    assert {k: held[k] for k in options} == options


@pytest.mark.parametrize("option", options("allocator"))
def test_allocators_instantiate(option):
    cfg = compose([f"allocator={option}"])
    allocator = build_allocator(cfg.allocator)
    if cfg.allocator.keep_dense:
        assert isinstance(allocator, KeepDense) and list(allocator.kinds) == list(cfg.allocator.keep_dense)
        allocator = allocator.inner
    assert type(allocator) is get_class(cfg.allocator._target_)
    options = OmegaConf.to_container(cfg.allocator, resolve=True)
    options = {k: v for k, v in options.items() if k not in ("name", "_target_", "keep_dense")}
    if "validation" in options and allocator.validation is None:  # these options score no plans
        assert option == "composite" and not options["search_trials"]
        del options["validation"]
    if "validation" in options:  # the options given, the rest at their defaults
        options["validation"] = dataclasses.asdict(Validation(**options["validation"]))
    held = json.loads(json.dumps(vars(allocator), default=dataclasses.asdict))  # tuples as lists
    held.setdefault("spectrum", held.get("spectrum_source"))  # Energy keeps `spectrum` as spectrum_source
    assert {k: held[k] for k in options} == options
    wrapped = build_allocator(compose([f"allocator={option}", "allocator.keep_dense=[v_proj]"]).allocator)
    assert isinstance(wrapped, KeepDense) and wrapped.kinds == ("v_proj",)
    assert type(wrapped.inner) is type(allocator)


@pytest.mark.parametrize("option", options("calibration"))
def test_calibrations_instantiate(option, tmp_path):
    cfg = compose([f"calibration={option}", *REQUIRED.get(("calibration", option), [])])
    calib = build_calibration(cfg)
    assert calib.nsamples >= 1 and calib.seqlen >= 2


def test_mixed_calibration_draws_from_both_texts_by_weight(tmp_path):
    from lrc.data.mixture import Mixture
    from lrc.model.loading import byte_tokenizer

    (tmp_path / "LICENSE").write_text("0123456789" * 400)
    cfg = compose(["calibration=mixed", f"calibration.path={tmp_path}", "calibration.pattern=*",
                   "calibration.text_weight=3", "calibration.nsamples=8", "calibration.seqlen=16"])
    calib = build_calibration(cfg)
    assert isinstance(calib.source, Mixture) and calib.source.counts(8) == {"embedded": 2, "text": 6}
    tok = byte_tokenizer()
    digits = [set(tok.decode(w.tolist())) <= set("0123456789") for w in calib.windows(tok)]
    assert sum(digits) == 6
    assert calib.validation_windows(tok, 2, 16).shape == (2, 16)  # the embedded validation split


@pytest.mark.parametrize("option", options("benchmark"))
def test_benchmarks_instantiate(option, tmp_path):
    required = REQUIRED.get(("benchmark", option), [])
    if option == "textfile":  # its cloze task reads the file when built: a missing one fails before any model
        with pytest.raises(DataError, match="x.txt"):
            build_benchmarks(compose([f"benchmark={option}", *required]))
        text = tmp_path / "notes.txt"
        text.write_text(EmbeddedText("test").text())
        required = [f"benchmark.path={text}"]
    cfg = compose([f"benchmark={option}", *required])
    assert [b.name for b in build_benchmarks(cfg)]


def test_tiny_random_model_instantiates():
    cfg = compose(["model=tiny-random", "device=cpu"])
    loaded = build(cfg.model.load, "model")
    assert loaded.model.config.num_key_value_heads < loaded.model.config.num_attention_heads


def test_unknown_option_is_a_clear_error():
    from lrc.errors import ConfigError

    cfg = compose(["+factorizer.alpha=2"])
    with pytest.raises(ConfigError, match="factorizer.*alpha"):
        build(cfg.factorizer, "factorizer=svdllm")


@pytest.mark.parametrize("folder", ["experiments", "notebooks", "benchmarks"])
def test_experiment_notebook_and_benchmark_folders_hold_what_their_readme_lists(folder):
    readme = (REPO / folder / "README.md").read_text()
    files = {p.name for p in (REPO / folder).iterdir() if p.is_file() and not p.name.startswith(".")} - {"README.md"}
    assert files and set(re.findall(r"`([\w.-]+\.(?:py|md|ipynb))`", readme)) == files
    if folder == "experiments":  # its table has one row per experiment config
        rows = re.findall(r"^\| `(\w+)` \|", readme, re.M)
        assert sorted(rows) == sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _hydra_cfg(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_are_named_resumable_sweeps(experiment):
    cfg = _hydra_cfg([f"experiment={experiment}"])
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.sweep.dir == f"outputs/multirun/experiment/{experiment}"  # fixed: a re-run resumes
    assert params.ratio and all(0 < float(r) < 1 for r in params.ratio.split(","))
    group = "method" if "method" in params else "allocator"
    for choice in params[group].split(","):  # every swept choice composes with the experiment
        job = _hydra_cfg([f"experiment={experiment}", f"{group}={choice}"])
        assert job.allocator.name and job.factorizer.name
    if group == "allocator":
        assert set(params.allocator.split(",")) == {"uniform", "mgaa", "bayes", "ressvd_plc"}
        assert cfg.factorizer.name == "svdllm" and cfg.benchmark.zeroshot.tasks
    else:
        assert {"embedded", "pydocs"} <= set(cfg.benchmark.perplexity)  # in and out of domain side by side


def test_launchers_select_the_submitit_plugin():
    assert "BasicLauncher" in _hydra_cfg([]).hydra.launcher._target_
    slurm = _hydra_cfg(["launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert "SlurmLauncher" in slurm._target_ and slurm.partition == "gpu" and slurm.gpus_per_node == 1
    local = _hydra_cfg(["launcher=slurm_local"]).hydra.launcher
    assert local.partition == "debug" and local.gpus_per_node is None
    assert _hydra_cfg(["experiment=llama2_7b_svdllm"]).hydra.launcher.timeout_min == 720
