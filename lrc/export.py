"""``python -m lrc.export <run dir> [--merge] [--out DIR]``: the compressed model of a finished run,
saved as a checkpoint (see :mod:`lrc.model.checkpoint`).

The run's recorded config is compressed again (statistics and dense metrics come from the
cache; no benchmark is run) and the resulting rank plan is checked against the recorded one
before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lrc.config.build import from_record, load_model, run_spec
from lrc.errors import DataError, LrcError
from lrc.model.checkpoint import save_compressed
from lrc.paths import CHECKPOINT_DIR, RESULT_FILE
from lrc.pipeline import compress_and_evaluate
from lrc.results.records import read_record

log = logging.getLogger("lrc.export")


def export(run_dir: str | Path, out: str | Path | None = None, merge: bool = False) -> Path:
    run_dir = Path(run_dir)
    try:
        record = read_record(run_dir / RESULT_FILE)
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_dir}: no readable {RESULT_FILE} ({exc})") from None
    if record.get("status") != "done" or "config" not in record:
        raise DataError(f"{run_dir / RESULT_FILE}: the run did not finish (status {record.get('status')!r})")
    finetune = record["config"].get("finetune") or {}
    if finetune.get("_target_"):
        raise DataError(f"{run_dir} was fine-tuned (finetune={finetune.get('name')}): export would train again, "
                        "which is not bit-for-bit reproducible on every device; run it with save=true to keep "
                        "the model it evaluated")
    cfg = from_record(record["config"])
    spec = run_spec(cfg, benchmarks=False)
    loaded, _ = load_model(cfg, spec)
    outcome = compress_and_evaluate(loaded, spec)
    if outcome.ranks != record["ranks"]:
        changed = sorted(k for k in record["ranks"] if outcome.ranks.get(k) != record["ranks"][k])
        raise DataError(f"re-compressing {run_dir} gave another rank plan ({len(changed)} matrices differ, "
                        f"e.g. {changed[:2]}); its caches or code changed since the run")
    return save_compressed(loaded.model, loaded.tokenizer, Path(out) if out else run_dir / CHECKPOINT_DIR,
                           record=record, merge=merge)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrc.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: <run dir>/model)")
    parser.add_argument("--merge", action="store_true", help="save dense weights W = B A")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        path = export(args.run_dir, args.out, args.merge)
    except LrcError as exc:
        print(f"lrc: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
