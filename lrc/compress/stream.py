"""Calibration activations passing through the decoder one block at a time (layer-wise mode).

The inputs of every block (hidden states, and the keyword arguments the decoder hands each
block: rotary embeddings, masks) are recorded once by running the decoder with its blocks
replaced by recorders; then each block in turn runs over them and its outputs become the
next block's inputs.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lrc.errors import ConfigError
from lrc.model.adapters import decoder_blocks, decoder_stack
from lrc.stats.collect import batches
from lrc.stats.hooks import StatisticsHooks, hooks_on


class _Recorder(nn.Module):
    """Stands in for a decoder block: records what the decoder passes it, returns its input."""

    def __init__(self, keep_hidden: bool) -> None:
        super().__init__()
        self.keep_hidden = keep_hidden
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict[str, Any]] = []

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ConfigError("layerwise mode: the decoder passes its blocks positional arguments "
                              f"beyond the hidden states ({len(args)}); this architecture is not supported")
        if self.keep_hidden:
            self.hidden.append(hidden_states)
        self.kwargs.append(kwargs)
        return hidden_states


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class BlockStream:
    """The calibration activations at the input of the next decoder block to run.

    The blocks must be on the host or the device; everything else in the model is moved to
    ``device`` (embeddings, rotary tables, final norm, LM head).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.model, self.device = model, device
        self.path, self.blocks = decoder_blocks(model)
        originals = list(self.blocks)
        recorders = [_Recorder(keep_hidden=i == 0) for i in range(len(originals))]
        try:
            for i, recorder in enumerate(recorders):
                self.blocks[i] = recorder
            model.to(device)  # no block is in the model now
            decoder = decoder_stack(model)
            with torch.inference_mode():
                for batch in batches(windows, batch_size):
                    decoder(input_ids=batch.to(device), use_cache=False)
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        self.hidden = recorders[0].hidden
        self.kwargs = [r.kwargs for r in recorders]
        self.position = 0  # index of the block whose inputs `hidden` holds

    def run(self, index: int, hooks: StatisticsHooks | None = None, advance: bool = True) -> None:
        """Run block ``index`` (already on the device) over the activations, with ``hooks``;
        with ``advance`` its outputs become the activations."""
        if index != self.position:
            raise RuntimeError(f"block stream is at block {self.position}, not {index}")
        block = self.blocks[index]
        context = hooks_on(self.model, hooks.pre, hooks.post) if hooks is not None else nullcontext()
        with context, torch.inference_mode():
            outputs = [block_output(block(h, **kw)) for h, kw in zip(self.hidden, self.kwargs[index], strict=True)]
        if advance:
            self.hidden, self.position = outputs, index + 1


def layerwise_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                      home: Any) -> None:
    """A plain layer-wise forward over ``windows`` (no statistics): the floor of a streaming pass."""
    stream = BlockStream(model, windows, batch_size, device)
    for index, block in enumerate(stream.blocks):
        with home.visit(index, block, device):
            stream.run(index)
