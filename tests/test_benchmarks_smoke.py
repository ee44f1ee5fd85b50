"""Each benchmark of the scale/speed issue runs in quick mode and returns well-formed figures.

Checks the Figure contract (names, units, targets, finite values, ``met`` consistent with
being measured), not the targets themselves: speed is for ``make bench``, not for tests.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("bench_scale", "bench_compression", "bench_wire", "bench_trainer", "bench_gpu")


def _load(name: str) -> ModuleType:
    # pytest puts the repository root first on sys.path (pyproject: pythonpath), so this is
    # the repository's ``benchmarks`` package, not another distribution's of the same name.
    return importlib.import_module(f"benchmarks.{name}")


EXPECTED = {
    "bench_scale": {"sites_completed", "memory_ratio_4_over_2", "time_per_site_ratio_4_over_2",
                    "peak_memory_mb"},
    "bench_compression": {"int8_fewer_bytes", "int8_dice_cost"},
    "bench_wire": {"sent_over_float32", "received_over_float32",
                   "sent_serialized_over_float32", "received_serialized_over_float32"},
    "bench_trainer": {"throughput_fedmed_over_bare", "throughput_progress_over_bare"},
}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_mode_returns_contract_figures(name: str) -> None:
    mod = _load(name)
    from benchmarks.common import Figure

    figures = mod.run(quick=True)
    assert figures, f"{name} returned no figures"
    for f in figures:
        assert isinstance(f, Figure)
        assert f.benchmark == mod.NAME
        assert f.name and f.unit and f.target and f.detail
        assert isinstance(f.value, float) and math.isfinite(f.value), (f.name, f.value)
        assert f.met in (True, False, None)
        d = f.as_dict()
        assert set(d) >= {"benchmark", "name", "value", "unit", "target", "met", "detail"}
    names = {f.name for f in figures}
    if name == "bench_gpu":
        import torch

        if not torch.cuda.is_available():
            assert len(figures) == 1
            assert figures[0].met is None and figures[0].detail == "skipped: no CUDA device"
        else:
            assert names == {"amp_speedup", "largest_patch_batch2"}
            assert figures[1].value >= 16
        return
    assert names == EXPECTED[name]
    by = {f.name: f for f in figures}
    if name == "bench_scale":
        assert by["sites_completed"].value == 4
        assert by["peak_memory_mb"].value > 0
    if name == "bench_compression":
        # int8 sends one byte per weight instead of four (plus per-tensor framing).
        assert by["int8_fewer_bytes"].value > 2
    if name == "bench_wire":
        # The coordinator counts at least the float32 weights it ships.
        assert by["sent_over_float32"].value >= 1.0
        assert by["received_over_float32"].value >= 1.0
        assert by["sent_serialized_over_float32"].value >= by["sent_over_float32"].value
    if name == "bench_trainer":
        assert by["throughput_fedmed_over_bare"].value > 0
