"""Layer-wise (sequential) mode: calibration activations pass through one decoder block at a time.

The inputs of every block (hidden states, and the keyword arguments the decoder hands each
block: rotary embeddings, masks) are recorded once by running the decoder with its blocks
replaced by recorders. Then each block in turn is put on the work device, its statistics
are collected from the hidden states, it is decomposed and (once the plan is known)
factorized, its outputs become the next block's inputs, and it goes back to the host.
Only one block, its statistics and the calibration activations are on the device.

With ``compressed_inputs`` each block sees the outputs of the already-compressed blocks
before it (statistics of the compressed model, as in sequential SVD-LLM); otherwise the
dense outputs, which gives exactly the statistics, plan and model of whole-model mode.

Statistics are cached per block, so a sweep computes them once and a second streaming
pass (for allocators that need every spectrum before any matrix is factorized) reads them
back instead of holding the statistics of every block in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lrc.budget import is_low_rank
from lrc.compress.swap import apply_plan
from lrc.errors import ConfigError
from lrc.factorizers.base import Decomposition
from lrc.model.adapters import TargetLinear, decoder_blocks
from lrc.stats.cache import StatisticsCache
from lrc.stats.collect import batches, for_target
from lrc.stats.hooks import StatisticsHooks, hooks_on
from lrc.stats.kinds import FISHER, parse_kind
from lrc.stats.types import InputStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerwiseOptions:
    """``layerwise`` in the run config."""

    enabled: bool = False
    compressed_inputs: bool = False  # feed each block the outputs of the compressed blocks before it


def check_layerwise(kinds: frozenset[str]) -> None:
    """Layer-wise mode runs forward passes only; reject kinds that need the whole model."""
    if any(parse_kind(k)[0] == FISHER for k in kinds):
        raise ConfigError("layerwise=true: the fisher statistic (factorizer=fwsvd) needs a backward pass "
                          "through the whole model; use layerwise.enabled=false")


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


def _output(out: Any) -> torch.Tensor:
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
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
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
            outputs = [_output(block(h, **kw)) for h, kw in zip(self.hidden, self.kwargs[index], strict=True)]
        if advance:
            self.hidden, self.position = outputs, index + 1


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


def block_on(block: nn.Module, device: torch.device) -> Any:
    """``block`` (resident on the host) on the work device for the duration."""
    return ResidentBlocks().visit(0, block, device)


def block_statistics_key(base: dict[str, Any], index: int, targets: list[TargetLinear], inputs: Any = "dense"
                         ) -> dict[str, Any]:
    """Cache key of one block's statistics; ``inputs`` names what the block was fed."""
    return {**base, "mode": "layerwise", "block": index, "inputs": inputs,
            "targets": sorted({(t.group, t.shape[1]) for t in targets})}


def plan_digest(plan: Mapping[str, int]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(plan.items()))).encode()).hexdigest()[:16]


@dataclass
class LayerwiseResult:
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    cosine: dict[str, InputStatistics] = field(default_factory=dict)  # sublayer entries, all blocks
    errors: dict[str, float] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)
    statistics_cached: set[str] = field(default_factory=set)
    statistics_computed: set[str] = field(default_factory=set)
    forward_passes: int = 0


class LayerwiseCompressor:
    """Streams the calibration set through the blocks of ``model`` (see the module docstring).

    ``decompose(weight, stats) -> Decomposition`` is the factorizer; ``cache_base`` the plain-data
    key of the model and calibration set; ``watch(name)`` a timing context (stage names as in
    whole-model mode: ``calibration_s``, ``factorization_s``).
    """

    def __init__(self, model: nn.Module, targets: list[TargetLinear], windows: torch.Tensor, batch_size: int,
                 kinds: frozenset[str], device: torch.device, cache: StatisticsCache, cache_base: dict[str, Any],
                 decompose: Callable[[torch.Tensor, InputStatistics | None], Decomposition],
                 factorizer_identity: dict[str, Any], options: LayerwiseOptions,
                 watch: Callable[[str], Any], home: Any = None) -> None:
        check_layerwise(kinds)
        self.model, self.windows, self.batch_size, self.kinds = model, windows, batch_size, kinds
        self.device, self.cache, self.cache_base = device, cache, cache_base
        self.decompose_fn, self.factorizer_identity, self.options, self.watch = (
            decompose, factorizer_identity, options, watch)
        self.home = home or ResidentBlocks()
        self.path, self.blocks = decoder_blocks(model)
        self.by_block: dict[int, list[TargetLinear]] = {}
        for t in targets:
            self.by_block.setdefault(t.block, []).append(t)
        self.result = LayerwiseResult()

    # --- statistics of one block -------------------------------------------------------
    def _key(self, index: int, plan: Mapping[str, int] | None) -> dict[str, Any]:
        inputs: Any = "dense"
        if plan is not None:  # statistics of the compressed model depend on everything before
            inputs = {"factorizer": self.factorizer_identity, "plan": plan_digest(plan)}
        return block_statistics_key(self.cache_base, index, self.by_block.get(index, []), inputs)

    def all_cached(self, plan: Mapping[str, int] | None, compressed: bool = False) -> bool:
        return all(self.cache.has(self._key(i, plan if compressed else None), self.kinds)
                   for i in range(len(self.blocks)) if self._needs_statistics(i, plan))

    def _needs_statistics(self, index: int, plan: Mapping[str, int] | None) -> bool:
        """Before the plan is known every block's statistics are; after it, only those of blocks
        with a matrix to factorize (ResSVD's partial-layer plans keep the first blocks dense)."""
        return plan is None or any(is_low_rank(t.shape, plan[t.name]) for t in self.by_block.get(index, []))

    def _block_statistics(self, index: int, stream: BlockStream | None, plan: Mapping[str, int] | None,
                          advance: bool, needed: bool = True) -> dict[str, InputStatistics]:
        """Statistics of block ``index`` (cached or computed); runs the block when ``stream`` is
        given, advancing it unless the block is to be compressed before its outputs are taken."""
        ran = False

        def compute(missing: frozenset[str]) -> dict[str, InputStatistics]:
            nonlocal ran
            if stream is None:
                raise RuntimeError("statistics missing from the cache with no stream to compute them")
            hooks = StatisticsHooks(self.model, self.by_block.get(index, []), missing, self.windows.numel(),
                                    self.device, blocks=[index])
            stream.run(index, hooks, advance=advance)
            ran = True
            return hooks.finish()

        stats: dict[str, InputStatistics] = {}
        if self.kinds and needed:
            stats, cached = self.cache.get_or_compute(self._key(index, plan), self.kinds, compute, quiet=True)
            self.result.statistics_cached |= set(cached)
            self.result.statistics_computed |= set(self.kinds - cached)
        if stream is not None and not ran and advance:
            stream.run(index, advance=True)
        return stats

    # --- the passes -------------------------------------------------------------------
    def _stream(self, plan: Mapping[str, int] | None, compressed: bool) -> BlockStream | None:
        """A fresh stream of calibration activations, or None when every needed statistic is
        cached (then no block's outputs are needed)."""
        if not self.kinds or self.all_cached(plan, compressed):
            return None
        self.result.forward_passes += 1
        return BlockStream(self.model, self.windows, self.batch_size, self.device)

    def run(self, plan: Mapping[str, int] | None, keep: Callable[[str, Decomposition], bool] | None = None,
            decompositions: dict[str, Decomposition] | None = None, spectra: str | None = None) -> None:
        """One streaming pass over the blocks.

        With ``plan`` every block is factorized to it (using and freeing ``decompositions``
        computed by an earlier pass, else decomposing afresh). Without it, the pass gathers
        statistics and ``spectra``: ``"factorizer"`` decomposes every target (decompositions for
        which ``keep(name, dec)`` holds are kept on the host in ``decompositions``), ``"weight"``
        takes the singular values of the plain weights, None none.
        """
        compressed = plan is not None and self.options.compressed_inputs
        decompositions = {} if decompositions is None else decompositions
        with self.watch("calibration_s"):
            stream = self._stream(plan, compressed)
        for index in tqdm(range(len(self.blocks)), desc="layer-wise", leave=False, disable=None):
            targets = self.by_block.get(index, [])
            with self.home.visit(index, self.blocks[index], self.device):
                with self.watch("calibration_s"):
                    stats = self._block_statistics(index, stream, plan if compressed else None,
                                                   advance=not compressed,
                                                   needed=self._needs_statistics(index, plan))
                self.result.cosine.update({k: v for k, v in stats.items() if k.startswith("sublayer:")})

                def decompose(name: str, targets=targets, stats=stats) -> Decomposition:
                    target = next(t for t in targets if t.name == name)
                    return self.decompose_fn(self.model.get_submodule(name).weight, for_target(stats, target))

                with self.watch("factorization_s"):
                    if plan is not None:
                        errors, damping = apply_plan(self.model, targets, plan, decompose, decompositions)
                        self.result.errors.update(errors)
                        self.result.damping.update(damping)
                    elif spectra is not None:
                        for t in targets:
                            if spectra == "weight":
                                weight = self.model.get_submodule(t.name).weight.detach().double()
                                self.result.spectra[t.name] = torch.linalg.svdvals(weight).cpu()
                                continue
                            dec = decompose(t.name)
                            self.result.spectra[t.name] = dec.spectrum.detach().cpu()
                            if keep is not None and keep(t.name, dec):
                                decompositions[t.name] = dec.to("cpu")
                if compressed and stream is not None:
                    with self.watch("calibration_s"):
                        stream.run(index, advance=True)  # the compressed block's outputs


def layerwise_forward(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device,
                      home: Any = None) -> None:
    """A plain layer-wise forward over ``windows`` (no statistics): the floor of a streaming pass."""
    home = home or ResidentBlocks()
    stream = BlockStream(model, windows, batch_size, device)
    for index, block in enumerate(stream.blocks):
        with home.visit(index, block, device):
            stream.run(index)
