"""A randomly initialised decoder whose blocks never live in memory (:class:`StreamedBlocks`):
layer-wise mode on models larger than the host, tested without the weights of one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrc.model.adapters import decoder_blocks, rotary_modules
from lrc.model.blocks import StreamedBlocks
from lrc.model.checkpoint import rebuild_rotary
from lrc.model.loading import LoadedModel, byte_tokenizer, resolve_dtype


def random_fill(seed: int, std: float) -> Callable[[int, nn.Module], None]:
    """Deterministic random weights for block ``index``: linear weights N(0, std), biases 0,
    norm weights 1 (the same block gets the same weights on every visit)."""

    def fill(index: int, block: nn.Module) -> None:
        generator = torch.Generator(device="cpu").manual_seed(seed * 100_003 + index)
        for name, param in block.named_parameters():
            if param.ndim == 2:
                values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                param.copy_(values)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)

    return fill


LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}


def random_streamed(offload_dir: str | Path, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                    model_type: str = "llama", **config: Any) -> LoadedModel:
    """A randomly initialised decoder (Llama-2-7B-shaped by default; override any config field)
    whose blocks are streamed: nothing of size beyond the embeddings is ever allocated whole."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**LLAMA_7B, **config}
    cfg = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               tie_word_embeddings=False, **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype(dtype))
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    path, _ = decoder_blocks(model)
    for name, param in list(model.named_parameters()):
        if name.startswith(path + "."):
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        values = (torch.empty(param.shape).normal_(0.0, cfg.initializer_range, generator=generator)
                  if param.ndim == 2 else torch.ones(param.shape))
        setattr(module, leaf, nn.Parameter(values.to(dtype=param.dtype, device=device), requires_grad=False))
    rebuild_rotary(model)  # its tables are computed at construction: build it for real
    for module in rotary_modules(model).values():
        module.to(device)
    if any(t.is_meta for name, t in [*model.named_parameters(), *model.named_buffers()]
           if not name.startswith(path + ".")):
        raise RuntimeError("random_streamed: a tensor outside the decoder blocks is still on the meta device")
    identity = {"random_streamed": cfg.to_dict() | {"seed": seed}, "dtype": dtype}
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), identity=identity)
    loaded.blocks = StreamedBlocks(random_fill(seed, cfg.initializer_range), offload_dir)
    return loaded
