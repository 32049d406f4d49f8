"""Compressed checkpoints: a directory any transformers user can read, reloaded exactly.

Layout (``save_compressed``)::

    config.json, generation_config.json   the model's own config (transformers)
    model.safetensors (or shards + index)  weights: LowRankLinear factors ``<name>.first.weight``
                                           (A, r x n) and ``<name>.second.weight`` (B, m x r)
    tokenizer files                        the tokenizer
    lrc_plan.json                          format, version, every low-rank module's shape and rank
    result.json                            the lrc record of the run (when given)

No pickle anywhere: weights are safetensors, metadata JSON. ``load_compressed`` builds the
architecture from ``config.json`` on the ``meta`` device (no weights allocated twice), puts
a ``LowRankLinear`` of the recorded rank at every planned module and assigns the saved
tensors, so its logits equal the in-memory model's exactly. ``merge=True`` writes plain
dense weights (``W = B A``) that ``AutoModelForCausalLM.from_pretrained`` loads as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lrc.errors import DataError
from lrc.model.adapters import bias_flag, bias_flag_linears, rotary_modules
from lrc.model.layers import LowRankLinear, replace_module
from lrc.model.loading import resolve_dtype
from lrc.paths import RESULT_FILE

PLAN_FILE = "lrc_plan.json"
FORMAT = "lrc-lowrank"
VERSION = 1


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merged(layer: LowRankLinear) -> nn.Linear:
    """The dense ``nn.Linear`` computing what ``layer`` computes (W = B A)."""
    first = layer.first.weight
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.second.bias is not None,
                      dtype=first.dtype, device=first.device)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        if layer.second.bias is not None:
            dense.bias.copy_(layer.second.bias)
    return dense


def save_compressed(model: nn.Module, tokenizer: Any, path: str | Path, record: dict[str, Any] | None = None,
                    merge: bool = False) -> Path:
    """Write ``model`` (with its LowRankLinear layers) to the directory ``path``, atomically:
    it appears whole or not at all, and an earlier lrc checkpoint there is replaced only once
    the new one is complete. A path holding anything else is refused. Returns the path."""
    path = Path(path)
    _check_target(path)
    layers = low_rank_modules(model)
    if not layers:
        raise DataError("save_compressed: the model has no LowRankLinear layer (nothing was compressed)")
    plan = {"format": FORMAT, "version": VERSION, "merged": merge,
            "model_type": getattr(model.config, "model_type", None),
            "low_rank": {name: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                                "bias": m.second.bias is not None} for name, m in layers.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    swapped: dict[str, nn.Module] = {}
    try:
        if merge:
            swapped = {name: replace_module(model, name, merged(m)) for name, m in layers.items()}
            flags = _bias_flags(model, swapped)
            for name, module in _unbiased_linears(model, flags):
                swapped.setdefault(name, replace_module(model, name, _with_zero_bias(module)))
        else:
            flags = {}
        saved_flags = {flag: getattr(model.config, flag) for flag in flags}
        for flag in flags:
            setattr(model.config, flag, True)
        try:
            model.save_pretrained(tmp)
        finally:
            for flag, value in saved_flags.items():
                setattr(model.config, flag, value)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1) + "\n")
        if record is not None:
            (tmp / RESULT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        _replace_folder(tmp, path)
    finally:
        for name, module in swapped.items():
            replace_module(model, name, module)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check_target(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise DataError(f"{path} exists and is not a folder; refusing to overwrite it")
    if any(path.iterdir()) and not (path / PLAN_FILE).is_file():
        raise DataError(f"{path} is a non-empty folder that is not an lrc checkpoint; refusing to overwrite it")


def _replace_folder(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; an old folder there is moved aside first and removed last."""
    if not path.exists():
        os.replace(new, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old / "previous")
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old / "previous", path)  # the old checkpoint goes back where it was
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _bias_flags(model: nn.Module, merged_names: dict[str, nn.Module]) -> set[str]:
    """The config switches a merged model needs: a factorizer added an output bias (Bolaco's
    mean compensation) to a linear the architecture builds without one."""
    flags = set()
    for name, original in merged_names.items():
        if original.second.bias is None:
            continue
        flag = bias_flag(model, name)
        if flag is None:
            raise DataError(f"merge: {name} gained an output bias from the factorizer, which a dense "
                            f"{model.config.model_type} model has no config switch for; save without merge")
        if not getattr(model.config, flag):
            flags.add(flag)
    return flags


def _unbiased_linears(model: nn.Module, flags: set[str]) -> list[tuple[str, nn.Linear]]:
    suffixes = bias_flag_linears(model, flags)
    return [(n, m) for n, m in model.named_modules()
            if suffixes and isinstance(m, nn.Linear) and n.endswith(suffixes) and m.bias is None]


def _with_zero_bias(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=linear.weight.dtype,
                    device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        out.bias.zero_()
    return out


def read_plan(path: Path) -> dict[str, Any]:
    plan_path = path / PLAN_FILE
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is not a directory")
    if not plan_path.is_file():
        hint = (" (a plain transformers model: load it with AutoModelForCausalLM.from_pretrained)"
                if (path / "config.json").is_file() else "")
        raise DataError(f"{str(path)!r} has no {PLAN_FILE}: not an lrc compressed checkpoint{hint}")
    try:
        plan = json.loads(plan_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{plan_path}: unreadable rank plan ({exc})") from None
    if plan.get("format") != FORMAT or plan.get("version") != VERSION:
        raise DataError(f"{plan_path}: format {plan.get('format')!r} version {plan.get('version')!r}; "
                        f"this lrc reads {FORMAT!r} version {VERSION}")
    return plan


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file or an index of shards)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise DataError(f"{str(path)!r} holds no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path / name}: corrupted or truncated safetensors file ({exc})") from None
    return tensors


def rebuild_rotary(model: nn.Module) -> None:
    """Rotary tables are computed at construction and not saved: build those modules for real
    (after constructing the model on the meta device)."""
    for name, module in rotary_modules(model).items():
        if any(b.is_meta for b in module.buffers()):
            replace_module(model, name, type(module)(config=module.config))


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
                    ) -> tuple[nn.Module, Any]:
    """The model saved by :func:`save_compressed` (LowRankLinear layers as saved) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    plan = read_plan(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r}: unreadable config.json ({str(exc).splitlines()[0]})") from None
    if plan.get("model_type") != config.model_type:
        raise DataError(f"{str(path)!r}: the rank plan is for model_type {plan.get('model_type')!r}, config.json "
                        f"says {config.model_type!r}")
    weights = read_weights(path)
    torch_dtype = resolve_dtype(dtype) if dtype else next(iter(weights.values())).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if not plan.get("merged"):
        for name, spec in plan["low_rank"].items():
            try:
                dense = model.get_submodule(name)
            except AttributeError:
                dense = None
            if not isinstance(dense, nn.Linear) or tuple(dense.weight.shape) != (spec["out_features"],
                                                                                 spec["in_features"]):
                raise DataError(f"{str(path)!r}: the rank plan names {name} "
                                f"({spec['out_features']} x {spec['in_features']}), which this {config.model_type} "
                                "model does not have: the plan belongs to another model")
            replace_module(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                      bias=spec["bias"], dtype=torch_dtype, device="meta"))
    expected = set(model.state_dict())
    tied = {k for k in expected - set(weights) if _is_tied(model, k)}
    missing, unexpected = sorted(expected - set(weights) - tied), sorted(set(weights) - expected)
    if missing or unexpected:
        raise DataError(f"{str(path)!r}: weights do not match the rank plan and config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for key, tensor in weights.items():
        shape = shapes[key]
        if tuple(tensor.shape) != shape:
            raise DataError(f"{str(path)!r}: {key} has shape {tuple(tensor.shape)}, the plan says {shape}")
    model.load_state_dict({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()},
                          strict=False, assign=True)
    if tied:
        model.tie_weights()
    rebuild_rotary(model)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise DataError(f"{str(path)!r}: no weights for {still_meta[:3]}")
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is the output embedding tied to the input embedding (saved once)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    output = model.get_output_embeddings()
    return output is not None and key == f"{_name_of(model, output)}.weight"


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
