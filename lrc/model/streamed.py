"""Models whose decoder blocks do not live in memory (layer-wise mode on models larger than the host).

The model is built on the ``meta`` device; the embeddings, final norm and LM head are real.
Each block is materialised when it visits the work device (:meth:`StreamedBlocks.visit`)
and released to ``meta`` afterwards. A block changed by compression is first written to
``offload_dir`` as safetensors and read back from there on a later visit, so host memory
holds one block at a time whatever the model's size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrc.files import atomic_path
from lrc.model.layers import LowRankLinear
from lrc.model.loading import LoadedModel, byte_tokenizer, resolve_dtype


class StreamedBlocks:
    """Where streamed blocks come from (``fill(index, block)`` writes the weights of an
    empty block in place) and where compressed ones go (``offload_dir``)."""

    streamed = True

    def __init__(self, fill: Callable[[int, nn.Module], None], offload_dir: str | Path) -> None:
        self.fill = fill
        self.offload_dir = Path(offload_dir)
        self.seconds = 0.0  # spent materialising, storing and releasing blocks

    def stored(self, index: int) -> Path:
        return self.offload_dir / f"block-{index:04d}.safetensors"

    @contextmanager
    def visit(self, index: int, block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
        start = time.perf_counter()
        self._materialize(index, block, device)
        path = self.stored(index)
        self.seconds += time.perf_counter() - start
        try:
            yield block
        finally:
            start = time.perf_counter()
            if any(isinstance(m, LowRankLinear) for m in block.modules()):
                with atomic_path(path) as tmp:
                    save_file({k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}, str(tmp))
            block.to("meta")
            self.seconds += time.perf_counter() - start


    def materialize(self, blocks: nn.ModuleList, device: torch.device | str = "cpu") -> None:
        """Put every block in memory for good (compressed ones from ``offload_dir``): for
        evaluating a streamed model that fits after all."""
        for index, block in enumerate(blocks):
            self._materialize(index, block, device)

    def _materialize(self, index: int, block: nn.Module, device: torch.device | str) -> None:
        """Real tensors for an empty block: its compressed version when stored, else ``fill``."""
        block.to_empty(device=device)
        path = self.stored(index)
        if path.is_file():
            block.load_state_dict(load_file(str(path), device=str(device)))
        else:
            with torch.no_grad():
                self.fill(index, block)


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
    path, blocks = "model.layers", model.get_submodule("model.layers")
    for name, param in list(model.named_parameters()):
        if name.startswith(path + "."):
            continue
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        values = (torch.empty(param.shape).normal_(0.0, cfg.initializer_range, generator=generator)
                  if param.ndim == 2 else torch.ones(param.shape))
        setattr(module, leaf, nn.Parameter(values.to(dtype=param.dtype, device=device), requires_grad=False))
    rotary = model.model.rotary_emb  # its tables are computed at construction: build it for real
    model.model.rotary_emb = type(rotary)(config=rotary.config).to(device)
    del blocks
    if any(t.is_meta for name, t in [*model.named_parameters(), *model.named_buffers()]
           if not name.startswith(path + ".")):
        raise RuntimeError("random_streamed: a tensor outside the decoder blocks is still on the meta device")
    identity = {"random_streamed": cfg.to_dict() | {"seed": seed}, "dtype": dtype}
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), identity=identity)
    loaded.blocks = StreamedBlocks(random_fill(seed, cfg.initializer_range), offload_dir)
    return loaded
