"""`petl-tpr demo --seeds N`: the demo once per seed, then the mean and spread of every column, so a
reader can tell a real gap between methods from run-to-run noise.

    rows = run_seeds(DemoConfig(out_dir="runs/demo"), 3)

Seed s (s = config.seed, ..., config.seed + N - 1) runs the whole demo in `out_dir/seed-<s>/` (its
own data, initialisation, training order and pictures; finished steps are reused there as in a
single run). `out_dir` then gets the summary: `demo_table.txt` ("mean±sd", the sample standard
deviation over the seeds), `demo_results.json` (the summary rows, `seeds`, and every seed's record
under `per_seed`) and `demo_r1_vs_params.png` with error bars. One seed is a plain `run_demo`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from typing import Callable

from ..errors import check_int
from .report import write_report
from .run import DemoConfig, run_demo

SUMMARISED = ("trainable", "total", "percent", "R@1", "R@5", "R@10", "mAP", "mINP", "unseen_R@1", "unseen_R@5",
              "unseen_R@10", "unseen_mAP", "unseen_mINP", "train_s", "train_mb", "peak_mb")


def summarise(records: list[dict]) -> list[dict]:
    """One row per method over the seeds' records: each column's mean, and its sample standard
    deviation under `spread` (0 for one seed); `seeds` lists the seeds."""
    rows = []
    for method in [r["method"] for r in records[0]["results"]]:
        runs = [next(r for r in record["results"] if r["method"] == method) for record in records]
        row = {"method": method, "seeds": [r["seed"] for r in runs], "versions": runs[0]["versions"], "spread": {}}
        for key in SUMMARISED:
            values = [float(r[key]) for r in runs]
            row[key] = statistics.fmean(values)
            row["spread"][key] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def run_seeds(config: DemoConfig, seeds: int, *, fresh: bool = False,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run the demo for `seeds` consecutive seeds (see the module docstring); returns the summary
    rows (or, for one seed, `run_demo`'s rows)."""
    check_int("seeds", seeds)
    if seeds == 1:
        return run_demo(config, fresh=fresh, log=log)
    if fresh and config.out_dir.exists():
        shutil.rmtree(config.out_dir)
    records = []
    for k, seed in enumerate(range(config.seed, config.seed + seeds), 1):
        log(f"\n=== seed {seed} ({k}/{seeds}) ===")
        one = dataclasses.replace(config, seed=seed, out_dir=config.out_dir / f"seed-{seed}")
        run_demo(one, log=log)
        records.append(json.loads((one.out_dir / "demo_results.json").read_text(encoding="utf-8")))
    rows = summarise(records)
    unseen = {key: statistics.fmean(r["unseen"][key] for r in records) for key in records[0]["unseen"]}
    pretrain = {key: statistics.fmean(r["pretrain"][key] for r in records) for key in ("R@1", "mAP", "train_s")}
    log(f"\n{seeds} seeds, mean±sd (sample standard deviation):\n"
        + write_report(rows, pretrain, config.out_dir, unseen=unseen,
                       extra={"seeds": [r["results"][0]["seed"] for r in records], "per_seed": records}))
    log(f"\nsummary: {config.out_dir / 'demo_results.json'}; each seed's run, pictures included: "
        f"{config.out_dir}/seed-<s>/")
    return rows
