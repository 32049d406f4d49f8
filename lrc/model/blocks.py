"""Where the decoder blocks live between visits to the work device (layer-wise mode).

:class:`ResidentBlocks` keeps them in host memory. :class:`StreamedBlocks` keeps them
nowhere: the model is built on the ``meta`` device, each block is materialised when it
visits the work device and released to ``meta`` afterwards; a block changed by compression
is first written to ``offload_dir`` as safetensors and read back from there on a later
visit, so host memory holds one block at a time whatever the model's size.
Both add up the seconds spent moving blocks in ``seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lrc.files import atomic_path
from lrc.model.layers import LowRankLinear


class ResidentBlocks:
    """Blocks kept in host memory; each visits the work device in turn. ``seconds`` adds up
    the time spent moving blocks there and back."""

    streamed = False

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def visit(self, index: int, block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
        host = next(block.parameters()).device
        start = time.perf_counter()
        block.to(device)
        self.seconds += time.perf_counter() - start
        try:
            yield block
        finally:
            start = time.perf_counter()
            block.to(host)
            self.seconds += time.perf_counter() - start


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
