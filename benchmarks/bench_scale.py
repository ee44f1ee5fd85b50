"""Simulation scale: 8 to 64 sites on one machine (issue "Scale and speed").

One generated federation (``fedmed.data.synth``, 64 sites x ~2 cases, voxels 2.5x larger,
resampled to 5.5 mm: ~30x36x30 volumes) is simulated with its first 8, 16, 32 and 64
sites: a U-Net with channels (4, 8, 16), 16^3 patches, 1 local epoch, 3 rounds (the first
round also starts the Ray workers and imports torch in them; rounds 2-3 are timed).
Sites train in turn on a pool of ``cores / client_resources.num_cpus`` Ray workers.

Memory is the peak of the summed RSS of the whole process tree (driver, Ray's GCS and
raylet, every worker), sampled every 0.1 s.

Figures:

* ``sites_completed``: sites that trained in every round of the largest run (count).
* ``memory_ratio_64_over_8``: peak tree memory with the most sites over the fewest.
* ``time_per_site_ratio_64_over_8``: (round time / sites) at the most sites over the same
  at the fewest; 1 is perfectly linear in the number of sites.
* ``peak_memory_mb``: the largest run's peak tree memory (count, MB).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import _fixtures as fx
from benchmarks.common import Figure

NAME = "scale"
FULL_SITES = (8, 16, 32, 64)
QUICK_SITES = (2, 4)


def _one(yaml_path: Path, sites: int, rounds: int) -> dict[str, Any]:
    """One simulation of the first ``sites`` sites: timings, completion, peak memory."""
    from fedmed.federation.simulation import parallel_sites, run_federated

    cfg = fx.small_config(yaml_path, sites=sites, rounds=rounds)
    fx.warm_cache(cfg)
    out = fx.run_dir(f"scale{sites}")
    try:
        with fx.TreeMemory() as mem:
            run_federated(cfg, out, force=True)
        lines = fx.metrics_lines(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    completed = min(len(line.get("sites_trained") or []) for line in lines)
    # Rounds after the first: the first also starts the Ray workers and imports torch there.
    timed = lines[1:] or lines
    return {
        "sites": sites,
        "completed": completed,
        "round_seconds": sum(float(x["round_seconds"]) for x in timed) / len(timed),
        "first_round_seconds": float(lines[0]["round_seconds"]),
        "peak_bytes": mem.peak,
        "processes": mem.peak_processes,
        "parallel": parallel_sites(cfg),
    }


def run(quick: bool = False) -> list[Figure]:
    """Simulate growing federations; ``quick``: 2 and 4 sites, 1 round."""
    sizes = QUICK_SITES if quick else FULL_SITES
    rounds = 1 if quick else 3
    yaml_path = fx.synth_federation(max(sizes), 2, test_cases=1)
    runs = [_one(yaml_path, n, rounds) for n in sizes]
    small, big = runs[0], runs[-1]
    mem_ratio = big["peak_bytes"] / small["peak_bytes"]
    per_site_small = small["round_seconds"] / small["sites"]
    per_site_big = big["round_seconds"] / big["sites"]
    time_ratio = per_site_big / per_site_small
    rows = "; ".join(
        f"{r['sites']} sites: round {r['round_seconds']:.1f} s "
        f"({r['round_seconds'] / r['sites']:.2f} s/site), peak {r['peak_bytes'] / 2**20:.0f} MB "
        f"over {r['processes']} processes"
        for r in runs
    )
    setup = (
        f"synthetic federation, ~2 cases/site at 5.5 mm (~30x36x30), U-Net (4,8,16), 16^3 "
        f"patches, 1 local epoch, {rounds} round(s) (mean of rounds 2.. timed), "
        f"{small['parallel']} "
        f"sites trained at once"
    )
    extra = {"runs": runs}
    return [
        Figure(
            NAME, "sites_completed", float(big["completed"]), "sites",
            f"= {big['sites']}", big["completed"] == big["sites"],
            f"sites that trained in every round of the {big['sites']}-site run; {setup}", extra,
        ),
        Figure(
            NAME, f"memory_ratio_{big['sites']}_over_{small['sites']}", mem_ratio, "x",
            "<= 1.25x", mem_ratio <= 1.25,
            f"peak RSS of driver + Ray processes; {rows}", extra,
        ),
        Figure(
            NAME, f"time_per_site_ratio_{big['sites']}_over_{small['sites']}", time_ratio, "x",
            "<= 1.3x", time_ratio <= 1.3,
            f"round time per site (train + central evaluation); {rows}", extra,
        ),
        Figure(
            NAME, "peak_memory_mb", big["peak_bytes"] / 2**20, "MB", "(count)", None,
            f"peak summed RSS of the {big['sites']}-site run over {big['processes']} "
            f"processes (shared pages counted once per process)", extra,
        ),
    ]


if __name__ == "__main__":
    for fig in run(quick="--quick" in sys.argv):
        print(f"{fig.name}: {fig.value:.3g} {fig.unit} (target {fig.target}, met {fig.met}) "
              f"-- {fig.detail}")
