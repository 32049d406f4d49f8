"""LoRA recovery fine-tuning of the low-rank factors, merged back (issue 18).

Each factor F of a :class:`~lrc.model.layers.LowRankLinear` (A: r x n, B: m x r) gets a
trainable low-rank update (LoRA, Hu et al. 2021, through PEFT):

    F' = F + (alpha / q) U V,    U: rows x q, V: q x cols, U = 0 at the start,

trained for ``steps`` AdamW steps on the causal language-model loss over windows of a named
text source (never a benchmark text), then merged: F' replaces F, so the model has exactly
the parameters it had before and saves and reloads like any compressed checkpoint. The loss
of every step is recorded (result.json ``diagnostics.finetune``, a W&B table).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrc.data.windows import calibration_windows
from lrc.errors import ConfigError, NumericalError
from lrc.model.checkpoint import low_rank_modules

log = logging.getLogger(__name__)
TARGETS = ("factors", "all")  # the low-rank factors only | and every other nn.Linear but the LM head


@dataclass
class FinetuneReport:
    """What a fine-tuning run did: the loss of each step, its time, what it trained."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained_params: int = 0
    modules: int = 0

    def record(self) -> dict[str, Any]:
        return {"losses": [round(v, 6) for v in self.losses], "seconds": self.seconds,
                "trained_params": self.trained_params, "modules": self.modules}


@dataclass(frozen=True)
class LoRA:
    """LoRA on the compressed model's factors over ``source`` text (see the module docstring)."""

    source: Any
    steps: int = 60
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    nsamples: int = 64
    seqlen: int = 256
    batch_size: int = 4
    targets: str = "factors"
    seed: int = 0
    weight_decay: float = 0.0
    warmup: int = 5
    evaluate_before: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "rank", "nsamples", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"finetune.{key}={value!r} must be a positive integer")
        if isinstance(self.seqlen, bool) or not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ConfigError(f"finetune.seqlen={self.seqlen!r} must be an integer >= 2")
        for key in ("lr", "alpha"):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and value > 0 and math.isfinite(value)):
                raise ConfigError(f"finetune.{key}={value!r} must be a positive number")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"finetune.dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"finetune.warmup={self.warmup!r} must be an integer >= 0")
        if self.targets not in TARGETS:
            raise ConfigError(f"finetune.targets={self.targets!r} is not one of {TARGETS}")

    def target_modules(self, model: nn.Module) -> list[str]:
        """Full names of the linears that get a LoRA update."""
        factors = [f"{name}.{part}" for name in low_rank_modules(model) for part in ("first", "second")]
        if self.targets == "factors":
            return factors
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inside = set(low_rank_modules(model))
        dense = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and m is not head and not any(n.startswith(f"{i}.") for i in inside)]
        return factors + dense

    def windows(self, tokenizer: Any) -> torch.Tensor:
        return calibration_windows(self.source, tokenizer, self.nsamples, self.seqlen, self.seed)

    def run(self, model: nn.Module, tokenizer: Any, device: torch.device | None = None) -> FinetuneReport:
        """Fine-tune ``model`` in place and merge the updates; return what happened (the global
        random state is left as it was)."""
        names = self.target_modules(model)
        if not names:
            raise ConfigError("finetune=lora: the model has no low-rank factors to fine-tune (nothing was compressed)")
        windows = self.windows(tokenizer)
        device = torch.device(device) if device is not None else next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self._train(model, names, windows, device)

    def _train(self, model: nn.Module, names: list[str], windows: torch.Tensor, device: torch.device
               ) -> FinetuneReport:
        from peft import LoraConfig, get_peft_model

        grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
        start = time.perf_counter()
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=names,
                            bias="none")
        wrapped = get_peft_model(model, config)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        report = FinetuneReport(trained_params=sum(p.numel() for p in trainable), modules=len(names))
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.learning_rate_factor)
        gen = torch.Generator().manual_seed(self.seed)
        was_training, finished = model.training, False
        wrapped.train()
        try:
            order: list[int] = []
            for step in range(self.steps):
                if len(order) < self.batch_size:  # a fresh permutation of the windows each epoch
                    order += torch.randperm(windows.shape[0], generator=gen).tolist()
                batch = windows[order[:self.batch_size]].to(device)
                order = order[self.batch_size:]
                loss = wrapped(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise NumericalError(f"finetune=lora: the loss became {float(loss.detach())} at step {step}; "
                                         f"lower finetune.lr={self.lr} (the model is left as it was before)")
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                report.losses.append(float(loss.detach()))
                if step % 10 == 0 or step == self.steps - 1:
                    log.info("finetune step %d/%d: loss %.4f", step + 1, self.steps, report.losses[-1])
            finished = True
        finally:
            if finished:
                wrapped.merge_and_unload()  # the updates folded into the factors; the LoRA modules are gone
            else:
                wrapped.unload()  # a failed run leaves the factors as they were
            model.train(was_training)
            for name, p in model.named_parameters():
                p.requires_grad_(grad_flags.get(name, False))
        report.seconds = time.perf_counter() - start
        return report

    def learning_rate_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def describe(self) -> dict[str, Any]:
        options = {k: v for k, v in vars(self).items() if k != "source"}
        return {"name": "lora", "source": self.source.describe(), **options}
