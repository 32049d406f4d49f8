"""Per-architecture adapter table, keyed by ``config.model_type`` (never by model name).

Each entry names the target linears of a decoder block, which of them share an input
(q/k/v; gate/up: one Gram matrix each) and where the attention and MLP sublayers start
and end (for sublayer statistics such as MGAA's cosine similarity). Shapes always come
from the weights, so grouped-query attention (k/v with n_kv_heads * head_dim rows)
needs nothing special.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lrc.errors import ConfigError


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a decoder block."""

    name: str  # "attn" | "mlp"
    start: str  # module whose INPUT is the sublayer's input hidden state
    end: str  # module whose OUTPUT is the sublayer's output, before the residual add
    input_groups: tuple[tuple[str, ...], ...]  # linears sharing one input, in forward order


@dataclass(frozen=True)
class Architecture:
    layers: tuple[str, ...]  # candidate paths of the decoder-block ModuleList (first that exists)
    sublayers: tuple[Sublayer, ...]
    # Modules whose tables are computed at construction and never saved (rotary embeddings):
    # a model built on the meta device must build them for real (candidate paths, those that exist).
    rotary: tuple[str, ...] = ("model.rotary_emb",)
    # Config switches that give a family of linears (by path suffix) a bias in a dense model.
    bias_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


_ATTN_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_MLP_GROUPS = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))

_BIAS_FLAGS = {"attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
               "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}

LLAMA_LIKE = Architecture(
    layers=("model.layers",),
    bias_flags=_BIAS_FLAGS,
    sublayers=(
        Sublayer("attn", start="input_layernorm", end="self_attn", input_groups=_ATTN_GROUPS),
        Sublayer("mlp", start="post_attention_layernorm", end="mlp", input_groups=_MLP_GROUPS),
    ),
)

# Gemma 3 norms each branch's output too (post_*_layernorm) before the residual add.
GEMMA3 = Architecture(
    layers=("model.layers", "model.language_model.layers"),
    rotary=("model.rotary_emb", "model.language_model.rotary_emb", "model.rotary_emb_local",
            "model.language_model.rotary_emb_local"),
    bias_flags=_BIAS_FLAGS,
    sublayers=(
        Sublayer("attn", start="input_layernorm", end="post_attention_layernorm", input_groups=_ATTN_GROUPS),
        Sublayer("mlp", start="pre_feedforward_layernorm", end="post_feedforward_layernorm",
                 input_groups=_MLP_GROUPS),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma3": GEMMA3,
    "gemma3_text": GEMMA3,
}


@dataclass(frozen=True)
class TargetLinear:
    """One linear layer to compress."""

    name: str  # dotted path in the model, e.g. "model.layers.3.self_attn.q_proj"
    block: int
    sublayer: str
    kind: str  # last path component, e.g. "q_proj"
    group: str  # name of the first linear reading the same input (its Gram is shared)
    shape: tuple[int, int]  # (out_features, in_features), from the weight


def architecture_for(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type={model_type!r} is not in the adapter table (known: {', '.join(sorted(ARCHITECTURES))}); "
            "add an entry to lrc/model/adapters.py"
        )
    return ARCHITECTURES[model_type]


def decoder_blocks(model: nn.Module, arch: Architecture | None = None) -> tuple[str, nn.ModuleList]:
    """The path and ModuleList of the decoder blocks."""
    arch = arch or architecture_for(model)
    for path in arch.layers:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return path, blocks
    raise ConfigError(f"no decoder-block list at any of {arch.layers} in {type(model).__name__}")


def find_targets(model: nn.Module) -> list[TargetLinear]:
    """All target linears of every decoder block, in forward order."""
    arch = architecture_for(model)
    path, blocks = decoder_blocks(model, arch)
    targets: list[TargetLinear] = []
    for i, block in enumerate(blocks):
        for sub in arch.sublayers:
            for group in sub.input_groups:
                group_name = f"{path}.{i}.{group[0]}"
                for rel in group:
                    module = block.get_submodule(rel)
                    if not isinstance(module, nn.Linear):
                        raise ConfigError(f"{path}.{i}.{rel} is a {type(module).__name__}, not nn.Linear "
                                          "(already compressed?)")
                    m, n = module.weight.shape
                    targets.append(TargetLinear(name=f"{path}.{i}.{rel}", block=i, sublayer=sub.name,
                                                kind=rel.rsplit(".", 1)[-1], group=group_name, shape=(m, n)))
    return targets


def rotary_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The rotary-embedding modules of ``model`` by path (see ``Architecture.rotary``)."""
    found = {}
    for path in architecture_for(model).rotary:
        try:
            found[path] = model.get_submodule(path)
        except AttributeError:
            continue
    return found


def bias_flag(model: nn.Module, name: str) -> str | None:
    """The config switch that gives linear ``name`` a bias in a dense model of this family
    (None: the family has none, or the config lacks it)."""
    flags = architecture_for(model).bias_flags
    flag = next((f for f, suffixes in flags.items() if name.endswith(suffixes)), None)
    return flag if flag is not None and hasattr(model.config, flag) else None


def bias_flag_linears(model: nn.Module, flags: set[str]) -> tuple[str, ...]:
    """Path suffixes of the linears that ``flags`` give a bias."""
    table = architecture_for(model).bias_flags
    return tuple(s for f in sorted(flags) for s in table[f])


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (what turns input ids into the last hidden states)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model
