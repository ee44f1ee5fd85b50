"""The DP-SGD data loader: Poisson samples of patients, one patch per sampled patient.

Plain training iterates shuffled patches (``patches_per_case`` per case); DP-SGD needs the
patient as the unit of sampling instead: every step includes each patient independently with
probability ``q`` (the sampled Gaussian mechanism the accountant assumes), and a sampled
patient contributes exactly one example. Batches may be empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


class PatientPatches(Dataset[dict[str, Any]]):
    """One patch per patient: item ``(step, i)`` is a patch of case ``i`` for DP step ``step``.

    Wraps the trainer's patch dataset (``patches_per_case`` items per case, case ``i``
    first at ``i * patches_per_case``) so that a sampled patient contributes exactly one
    example to a step, whatever ``patches_per_case`` says for non-private training. The
    patch is drawn afresh for every step (a patient sampled twice in an epoch gets two
    different patches), reproducibly from ``(seed, step, case)``.

    Item: as :class:`fedmed.data.dataset.PatchDataset`'s, ``image`` ``(C, P, P, P)``.
    """

    def __init__(self, patches: Any) -> None:
        self.patches = patches
        self.patches_per_case = int(patches.patches_per_case)

    def __len__(self) -> int:
        return len(self.patches) // self.patches_per_case

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        step, case = key
        self.patches.set_epoch(step)
        item: dict[str, Any] = self.patches[case * self.patches_per_case]
        return item


class PoissonSteps(Sampler[list[tuple[int, int]]]):
    """Poisson batches of patients (Opacus' ``UniformWithReplacementSampler``), one epoch a pass.

    Each patient is in a batch independently with probability ``sample_rate``, so it
    appears at most once per step and batches may be empty. An epoch is ``steps`` batches;
    every index comes tagged with its global step (``epoch * steps + k``), which seeds the
    patient's patch in :class:`PatientPatches`.

    Opacus' ``DPDataLoader`` does not serve here: it fixes an epoch at ``int(1 / q)`` steps,
    while the ledger's plan counts ``ceil(1 / q)`` (:func:`steps_per_epoch`).
    """

    def __init__(
        self, num_cases: int, sample_rate: float, steps: int, generator: torch.Generator
    ) -> None:
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.steps = int(steps)
        self.first_step = 0
        self.sampler = UniformWithReplacementSampler(
            num_samples=num_cases, sample_rate=sample_rate, generator=generator, steps=steps
        )

    def set_epoch(self, epoch: int) -> None:
        """Number the next pass's steps from ``epoch * steps``."""
        self.first_step = int(epoch) * self.steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k, cases in enumerate(self.sampler):
            yield [(self.first_step + k, int(c)) for c in cases]


def _collate_patients(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    if not items:
        # an empty Poisson batch: a real step that releases pure noise
        return {"case_index": torch.zeros(0, dtype=torch.long)}
    return dict(default_collate(items))


class PatientLoader(DataLoader[dict[str, Any]]):
    """A ``DataLoader`` over :class:`PatientPatches` batched by :class:`PoissonSteps`."""

    def set_epoch(self, epoch: int) -> None:
        """Number the next pass's steps from ``epoch * steps`` (call before each epoch)."""
        cast(PoissonSteps, self.batch_sampler).set_epoch(epoch)


def patient_loader(
    patches: Any,
    sample_rate: float,
    steps: int,
    generator: torch.Generator,
    num_workers: int = 0,
) -> PatientLoader:
    """The DP data loader: ``steps`` Poisson batches of patients per epoch, one patch each.

    Args:
        patches: the trainer's patch dataset (:class:`fedmed.data.dataset.PatchDataset`).
        sample_rate: Poisson sampling rate of patients.
        steps: batches per epoch.
        generator: draws the patient sampling (OS entropy or ``torchcsprng``).
        num_workers: DataLoader worker processes.

    Returns:
        The loader; an empty batch is ``{"case_index": tensor([])}``.
    """
    items = PatientPatches(patches)
    return PatientLoader(
        items,
        batch_sampler=PoissonSteps(len(items), sample_rate, steps, generator),
        collate_fn=_collate_patients,
        num_workers=num_workers,
        # the loader draws worker base seeds from its own generator every epoch; they must
        # neither shift the sampling generator nor the global RNG (patch draws do not use them)
        generator=torch.Generator(),
    )
