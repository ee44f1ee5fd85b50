"""Shared helpers of the benchmarks: small generated federations, configs, memory sampling.

* :func:`synth_federation` generates a synthetic federation (``fedmed.data.synth``) once
  into a cache folder under the system temp dir and returns its ``federation.yaml``; later
  calls with the same arguments reuse it (and its preprocessed-case caches).
* :func:`small_config` turns it into a config sized for a benchmark (tiny model, small
  patches, quiet trainer, coarse target spacing so volumes are ~24^3-32^3).
* :func:`warm_cache` preprocesses every site once, so timed runs never pay for it.
* :class:`TreeMemory` samples the resident memory of this process plus all its descendants
  (Ray's GCS, raylet and workers are children of the driver) in a background thread and
  keeps the peak.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fedmed.config import FederationConfig, load_config

CACHE_ROOT = Path(tempfile.gettempdir()) / "fedmed-bench-cache"
MARKER = ".complete"


def synth_federation(
    sites: int,
    cases_per_site: int,
    *,
    test_cases: int = 2,
    scale: float = 2.5,
    seed: int = 0,
) -> Path:
    """A generated federation, made once and then reused from the temp-dir cache.

    Args:
        sites: training sites.
        cases_per_site: mean cases per site (the generator skews cohort sizes).
        test_cases: central test cases.
        scale: voxel-size multiplier of the scanners (2.5: ~47x58x47 raw volumes).
        seed: federation seed.

    Returns:
        Path of its ``federation.yaml``.
    """
    key = f"synth-s{sites}-c{cases_per_site}-t{test_cases}-x{scale:g}-seed{seed}"
    return cached_federation(
        key, sites=sites, cases_per_site=cases_per_site, test_cases=test_cases, seed=seed,
        scale=scale,
    )


def cached_federation(key: str, **generate: Any) -> Path:
    """``generate_federation(**generate)`` made once under ``CACHE_ROOT / key``, then reused.

    ``key`` must name every argument that shapes the federation. ``unseen_cases`` defaults to
    0 and the progress bar is off.

    Returns:
        Path of its ``federation.yaml``.
    """
    from fedmed.data.synth import generate_federation

    dest = CACHE_ROOT / key
    if (dest / MARKER).is_file():
        return dest / "federation.yaml"
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    # Generate next to the destination and rename, so an interrupted run never leaves a
    # half-written federation that looks complete.
    work = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=CACHE_ROOT))
    try:
        generate_federation(work / "fed", **{"unseen_cases": 0, "progress": False, **generate})
        (work / "fed" / MARKER).write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        (work / "fed").rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest / "federation.yaml"


def small_config(
    yaml_path: Path,
    *,
    sites: int | None = None,
    channels: tuple[int, ...] = (4, 8, 16),
    num_res_units: int = 0,
    patch: int = 16,
    target_spacing: float = 5.5,
    rounds: int = 1,
    local_epochs: int = 1,
    patches_per_case: int = 2,
    evaluate_sites: bool = False,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    compression: str = "none",
    learning_rate: float = 3e-3,
) -> FederationConfig:
    """The generated federation's config resized for a benchmark.

    Args:
        yaml_path: ``federation.yaml`` from :func:`synth_federation`.
        sites: keep only the first ``sites`` sites (default all).
        channels: U-Net channels per level.
        num_res_units: residual units per level.
        patch: cubic patch size.
        target_spacing: isotropic resampling (mm); 5.5 mm gives ~25x31x25 brains.
        rounds: federated rounds.
        local_epochs: local epochs per round.
        patches_per_case: patches drawn per case per epoch.
        evaluate_sites: federated evaluation on the sites' validation cases.
        val_fraction: share of each site's cases held out for validation.
        test_fraction: share of each site's cases held out for testing.
        compression: ``compression.kind``.
        learning_rate: trainer learning rate.
    """
    cfg = load_config(yaml_path)
    data = cfg.model_dump()
    if sites is not None:
        data["sites"] = data["sites"][:sites]
    data["preprocessing"].update(
        target_spacing=(target_spacing,) * 3, patch_size=(patch,) * 3,
        patches_per_case=patches_per_case, augment=False,
    )
    data["model"].update(channels=tuple(channels), num_res_units=num_res_units)
    data["training"].update(
        batch_size=2, amp=False, progress=False, device="cpu", sw_batch_size=4,
        val_fraction=val_fraction, test_fraction=test_fraction, learning_rate=learning_rate,
    )
    n = len(data["sites"])
    data["federation"].update(
        strategy="fedavg", rounds=rounds, local_epochs=local_epochs, min_train_sites=n,
        min_available_sites=n, evaluate_sites=evaluate_sites, max_parallel_sites=None,
        client_resources={"num_cpus": 1, "num_gpus": 0.0}, round_timeout_s=1800,
    )
    data["compression"] = {"kind": compression, "deltas": True}
    from fedmed.config import config_from_dict

    return config_from_dict(data)


def warm_cache(cfg: FederationConfig) -> None:
    """Preprocess every site's cases and the central test set into their caches."""
    from fedmed.data.dataset import load_site_cases, load_test_cases

    for name in cfg.site_names:
        load_site_cases(cfg, name, "all")
    if cfg.central_test is not None:
        load_test_cases(cfg, cfg.resolve(cfg.central_test))


def run_dir(prefix: str) -> Path:
    """A fresh temporary run folder (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"fedmed-bench-{prefix}-"))


def metrics_lines(run: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` lines."""
    import json

    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


class TreeMemory:
    """Peak resident memory (bytes) of this process and all its descendants.

    Sums RSS over the process tree every ``interval`` seconds in a daemon thread; use as a
    context manager and read :attr:`peak` (and :attr:`peak_processes`) afterwards. RSS
    counts shared pages once per process, so this overstates what the machine needs; it
    is the same overstatement at every federation size.
    """

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.interval = interval
        self.root = psutil.Process()
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        """One sample of the tree's summed RSS (bytes)."""
        import psutil

        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except psutil.Error:
            pass
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # a worker that exited between listing and reading
                continue
        if total > self.peak:
            self.peak = total
            self.peak_processes = len(procs)
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
