"""GPU training throughput of the 3D U-Net: mixed precision on and off, largest patch.

On a CUDA machine, the default U-Net (``fedmed.models.build_model`` with the default
``ModelConfig``: channels 16, 32, 64, 128, 2 residual units; 3 modalities, 5 classes)
trains on random 96^3 patches (quick: 64^3) at batch 2 with AdamW and MONAI's
``DiceCELoss``, in float32 and under ``torch.autocast`` (bf16 where supported, else fp16
with a gradient scaler), alternating repeats; then a binary search over cubic patch
sizes (multiples of 16) finds the largest that trains at batch 2 with AMP without running
out of memory.

Figures:

* ``amp_speedup``: voxels/s with AMP over voxels/s in float32 (side by side).
* ``largest_patch_batch2``: edge of the largest cubic patch (voxels) that trains at batch 2
  with AMP (count), on the named GPU.

Without CUDA: one figure (value 0) with ``met=None`` and detail "skipped: no CUDA device".
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.common import Figure

NAME = "gpu"
IN_CHANNELS = 3
NUM_CLASSES = 5


def _setup(patch: int, amp: bool) -> tuple[Any, Any, Any, Any, Any, Any]:
    import torch
    from monai.losses import DiceCELoss

    from fedmed.config import ModelConfig
    from fedmed.models import build_model

    dev = torch.device("cuda")
    model = build_model(ModelConfig(), IN_CHANNELS, NUM_CLASSES).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bf16 = torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not bf16)
    x = torch.randn(2, IN_CHANNELS, patch, patch, patch, device=dev)
    y = torch.randint(0, NUM_CLASSES, (2, 1, patch, patch, patch), device=dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    return model, opt, scaler, x, y, loss_fn


def _steps(patch: int, amp: bool, steps: int) -> float:
    """Seconds for ``steps`` training steps (after 2 warm-up steps)."""
    import torch

    model, opt, scaler, x, y, loss_fn = _setup(patch, amp)
    avail = torch.ones(2, IN_CHANNELS, dtype=torch.bool, device=x.device)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=amp):
            logits = model(x, avail)
        loss = loss_fn(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _fits(patch: int) -> bool:
    import gc

    import torch

    ok = True
    try:
        _steps(patch, amp=True, steps=1)
    except torch.OutOfMemoryError:
        ok = False
    # Outside the except block: the traceback (and the tensors its frames hold) is gone.
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def largest_patch(low: int = 16, high: int = 512) -> int:
    """Largest multiple of 16 in [low, high] that trains at batch 2 with AMP (0: none)."""
    lo, hi = low // 16, high // 16
    best = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if _fits(mid * 16):
            best, lo = mid * 16, mid + 1
        else:
            hi = mid - 1
    return best


def run(quick: bool = False) -> list[Figure]:
    """Measure on CUDA; a single skipped figure without it."""
    import torch

    if not torch.cuda.is_available():
        return [Figure(NAME, "amp_speedup", 0.0, "x", ">= 1x", None,
                       "skipped: no CUDA device")]
    gpu = torch.cuda.get_device_name(0)
    patch = 64 if quick else 96
    steps = 3 if quick else 10
    repeats = 1 if quick else 3
    totals = {True: 0.0, False: 0.0}
    for i in range(repeats):
        for amp in ((False, True) if i % 2 == 0 else (True, False)):
            totals[amp] += _steps(patch, amp, steps)
            torch.cuda.empty_cache()
    voxels = 2 * patch**3 * steps * repeats
    vps = {amp: voxels / secs for amp, secs in totals.items()}
    speedup = vps[True] / vps[False]
    high = 192 if quick else 512
    biggest = largest_patch(16, high)
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return [
        Figure(NAME, "amp_speedup", speedup, "x", ">= 1x", speedup >= 1.0,
               f"{gpu}: default U-Net, batch 2, {patch}^3 patches, AdamW + DiceCE; "
               f"AMP ({dtype}) {vps[True] / 1e6:.1f} Mvox/s vs float32 "
               f"{vps[False] / 1e6:.1f} Mvox/s ({steps} steps x {repeats} alternating repeats)",
               {"gpu": gpu, "voxels_per_s": {"amp": vps[True], "float32": vps[False]}}),
        Figure(NAME, "largest_patch_batch2", float(biggest), "voxels/edge", "(count)", None,
               f"{gpu}: largest cubic patch (multiple of 16, searched up to {high}) training "
               f"at batch 2 with AMP ({dtype}); "
               f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
               {"gpu": gpu}),
    ]


if __name__ == "__main__":
    for f in run(quick="--quick" in sys.argv):
        print(f"{f.name}: {f.value:.4g} {f.unit} (target {f.target}, met {f.met}) -- {f.detail}")
