"""When a sweep ends, its comparison lands where people look (a Hydra callback).

``on_multirun_end`` runs where the sweep was launched once every job has returned (the
local launcher, or after the SLURM array with submitit). It collects the sweep's
``result.json`` files, writes what ``python -m lrc.report`` makes (``report.md``,
``report.csv``, the PNG plots) into ``<sweep dir>/report/``, and logs the table and plots to
W&B as one run tagged ``sweep-report`` in the sweep's group, so the dashboard shows the
comparison next to the runs. A re-run (resumed) sweep writes and logs them again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lrc.config.resolvers import group_of
from lrc.report import collect, rows, write_report
from lrc.results.tracking import WandbTracker

log = logging.getLogger("lrc.sweep")
REPORT_DIR = "report"
TAG = "sweep-report"  # the report's W&B run carries it (the runs of the sweep share its group)


class SweepReport(Callback):
    """Writes and logs the sweep's comparison when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        records, problems = collect(sweep)
        for problem in problems:
            log.warning("sweep report: skipped %s", problem)
        if not records:
            log.warning("sweep report: no result.json under %s", sweep)
            return
        out = sweep / REPORT_DIR
        written = write_report(records, out)
        log.info("sweep report: %d runs (%d done) -> %s", len(records),
                 sum(r["status"] == "done" for r in records), out / "report.md")
        logger = OmegaConf.to_container(config.logger, resolve=False)
        if str(logger.get("_target_", "")).endswith("WandbTracker"):
            self.log_to_wandb(logger, out, records, written)

    @staticmethod
    def log_to_wandb(logger: dict[str, Any], out: Path, records: list[dict[str, Any]], written: list[Path]) -> None:
        tracker = WandbTracker(output_dir=out, config={"sweep": str(out.parent), "runs": len(records)},
                               project=logger.get("project", "lrc"), mode=logger.get("mode", "offline"),
                               group=group_of(out.parent), run_name="sweep report", entity=logger.get("entity"),
                               tags=[*(logger.get("tags") or []), TAG])
        header, table = rows(records)
        with tracker:
            tracker.log_table("comparison", header, table)
            for path in written:
                if path.suffix == ".png":
                    tracker.log_image(path.stem, path)
