"""A realistic synthetic multi-site brain MRI federation (``fedmed data synth``).

Every subject is the MNI152 2009 template (shipped in the ``nilearn`` wheel, read offline)
under a random smooth deformation, with synthetic white-matter lesions
(:mod:`fedmed.data.synth_anatomy`). Each site is a
:class:`~fedmed.data.synth_scanner.ScannerProfile`: voxel spacing,
on-disk orientation, field of view, intensity scale and offset, bias field, noise, cohort
size, lesion load and the modalities it acquires. A subject is sampled straight from the
template onto the scanner's voxel grid (world -> template coordinates through the inverse
deformation), never resampled twice.

Labels: 0 background, 1 CSF, 2 GM, 3 WM, 4 lesion. Modalities T1, T2 and FLAIR are derived
from partial-volume tissue probabilities with the usual contrasts (T1: WM > GM > CSF,
lesions dark; T2: CSF > GM > WM, lesions bright; FLAIR: CSF dark, GM > WM, lesions very
bright), the template's own T1 giving the texture.

Same seed, same bytes: gzip headers carry no time stamp, JSON and YAML are written with
fixed key order, and every case draws from its own seed derived from
``(seed, site, case index)``, whatever the generation order or the number of workers.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmed.data.synth_recipe import (
    CASES_PER_SITE,
    TARGET_SPACING,
    default_preprocessing_section,
    default_training_sections,
)
from fedmed.data.synth_scanner import (
    MODALITIES,
    ScannerProfile,
    SiteFormat,
    SyntheticSubject,
    default_scanners,
    simulate_subject,
    subject_seed,
    unseen_scanner,
)
from fedmed.errors import ConfigError, DatasetFormatError, ImageWriteError

LABELS = {0: "background", 1: "CSF", 2: "GM", 3: "WM", 4: "lesion"}
SUMMARY_FILE = "synth.json"


def _nifti_gz(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type) -> None:
    """Write ``data`` ((X,Y,Z) or (X,Y,Z,C)) as .nii.gz with no time stamp in the gzip header."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_yaml(path: Path, obj: Any) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False, default_flow_style=None))


@dataclass(frozen=True)
class _Job:
    """One case to simulate and write (picklable for worker processes)."""

    out: str
    layout: SiteFormat
    case_id: str
    seed: int
    scanner: ScannerProfile
    modalities: tuple[str, ...]
    lesion_load: float
    template_resolution: int


def _run_job(job: _Job) -> dict[str, Any]:
    """Simulate and write one case; returns its summary row."""
    scanner = replace(job.scanner, modalities=job.modalities)
    subj = simulate_subject(
        job.seed, scanner, lesion_load=job.lesion_load, reference_spacing=None,
        template_resolution=job.template_resolution,
    )
    root = Path(job.out)
    affine = subj.label.affine
    label = subj.label.array[0]
    stack = [subj.images[m].array[0] for m in job.modalities]
    i16 = np.int16
    if job.layout == "msd":
        _nifti_gz(root / "imagesTr" / f"{job.case_id}.nii.gz", np.stack(stack, -1), affine, i16)
        _nifti_gz(root / "labelsTr" / f"{job.case_id}.nii.gz", label, affine, np.uint8)
    elif job.layout == "nnunet":
        for c, arr in enumerate(stack):
            _nifti_gz(root / "imagesTr" / f"{job.case_id}_{c:04d}.nii.gz", arr, affine, i16)
        _nifti_gz(root / "labelsTr" / f"{job.case_id}.nii.gz", label, affine, np.uint8)
    else:
        for mod, arr in zip(job.modalities, stack, strict=True):
            _nifti_gz(root / job.case_id / f"{mod}.nii.gz", arr, affine, i16)
        _nifti_gz(root / job.case_id / "label.nii.gz", label, affine, np.uint8)
    brain = int(np.count_nonzero(label))
    return {
        "case_id": job.case_id,
        "scanner": job.scanner.name,
        "seed": job.seed,
        "lesions": subj.num_lesions,
        "lesion_fraction_of_brain": round(float(np.count_nonzero(label == 4)) / max(brain, 1), 5),
        "shape": list(label.shape),
    }


def _write_site_manifest(root: Path, name: str, layout: SiteFormat, modalities: Sequence[str],
                         case_ids: Sequence[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if layout == "msd":
        _write_json(root / "dataset.json", {
            "name": name,
            "description": "fedmed synthetic brain MRI (MNI152-derived)",
            "tensorImageSize": "4D",
            "modality": {str(i): m for i, m in enumerate(modalities)},
            "labels": {str(k): v for k, v in LABELS.items()},
            "numTraining": len(case_ids),
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                for c in case_ids
            ],
            "test": [],
        })
    elif layout == "nnunet":
        _write_json(root / "dataset.json", {
            "name": name,
            "channel_names": {str(i): m for i, m in enumerate(modalities)},
            "labels": {v: k for k, v in LABELS.items()},
            "numTraining": len(case_ids),
            "file_ending": ".nii.gz",
        })
    else:
        _write_yaml(root / "site.yaml", {
            "name": name,
            "modalities": list(modalities),
            "labels": dict(LABELS),
        })


def cohort_sizes(num_sites: int, cases_per_site: int,
                 weights: Sequence[float] | None = None) -> list[int]:
    """Skewed cohort sizes with mean ``cases_per_site`` (largest-remainder rounding).

    With the default four sites and 10 cases per site: 16, 10, 8, 6.
    """
    w = np.array(weights if weights is not None else [1.0] * num_sites, dtype=np.float64)
    total = num_sites * cases_per_site
    raw = w / w.sum() * total
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: total - sizes.sum()]:
        sizes[i] += 1
    # Every site needs at least one case; take them from the largest cohorts.
    while (sizes < 1).any():
        sizes[np.argmax(sizes)] -= 1
        sizes[np.argmin(sizes)] += 1
    return [int(s) for s in sizes]


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ImageWriteError(f"--out {out} is a file; give a folder for the federation")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ImageWriteError(
                f"--out {out} exists and is not empty; choose a new folder or pass --force "
                "to replace it"
            )
        # Guard against --force on an arbitrary folder: only replace our own output.
        if not ((out / SUMMARY_FILE).is_file() or (out / "federation.yaml").is_file()):
            raise ImageWriteError(
                f"--out {out} is not empty and holds no {SUMMARY_FILE} or federation.yaml from "
                "an earlier `fedmed data synth`; --force only replaces such a folder. Remove "
                "it yourself or choose another folder"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def generate_federation(
    out: Path,
    *,
    sites: int = 4,
    cases_per_site: int = CASES_PER_SITE,
    test_cases: int = 8,
    unseen_cases: int = 6,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    scale: float = 1.0,
    workers: int = 1,
    scanners: Sequence[ScannerProfile] | None = None,
) -> Path:
    """Generate a synthetic multi-site federation and its ``federation.yaml``.

    Args:
        out: destination folder; must not exist or be empty (unless ``force``).
        sites: number of training sites.
        cases_per_site: mean cases per site (actual sizes are skewed).
        test_cases: central test cases, drawn round-robin from every site's scanner.
        unseen_cases: cases of a scanner no site has (``unseen-scanner/``); 0: none.
        seed: the federation seed; same seed and arguments give byte-identical files.
        progress: show a progress bar.
        force: replace ``out`` if it holds an earlier synthetic federation.
        scale: voxel-size multiplier (e.g. 5 gives ~24^3 volumes for tests).
        workers: processes that generate cases in parallel (output does not depend on it).
        scanners: training scanners; default :func:`default_scanners`.

    Returns:
        Path of the written ``federation.yaml``.

    Raises:
        ConfigError: a count or the scale is out of range.
        ImageWriteError: ``out`` is a file, or not empty without ``force``.
        DatasetFormatError: a written site does not load back (a bug; please report).
    """
    _check_counts(sites=sites, cases_per_site=cases_per_site, test_cases=test_cases,
                  unseen_cases=unseen_cases, workers=workers, scale=scale)
    out = Path(out)
    _prepare_out(out, force)
    profiles = list(scanners) if scanners is not None else default_scanners(sites, seed)
    profiles = [p.scaled(scale) if scale != 1.0 else p for p in profiles[:sites]]
    sizes = cohort_sizes(len(profiles), cases_per_site, [p.cohort_weight for p in profiles])
    jobs, site_rows = _training_jobs(out, profiles, sizes, seed)
    extra: dict[str, Any] = {}
    if test_cases:
        central_jobs, extra["central_test"] = _central_jobs(out, profiles, test_cases, seed)
        jobs += central_jobs
    unseen = unseen_scanner()
    unseen = unseen.scaled(scale) if scale != 1.0 else unseen
    if unseen_cases:
        unseen_jobs, extra["unseen"] = _unseen_jobs(out, unseen, unseen_cases, seed)
        jobs += unseen_jobs

    # The config goes first: it marks the folder as ours, so --force can clean up after an
    # interrupted run.
    cfg_path = _write_config(out, profiles, bool(test_cases), unseen.name if unseen_cases else None)
    case_rows = _run_jobs(jobs, workers, progress)
    summary = {
        "seed": seed,
        "target_spacing": list(TARGET_SPACING),
        "sites": site_rows,
        **extra,
        "cases": sorted(case_rows, key=lambda r: r["case_id"]),
    }
    _write_json(out / SUMMARY_FILE, summary)
    _verify(out, profiles, sizes, test_cases, unseen_cases, unseen.name)
    return cfg_path


_TEMPLATE_RESOLUTION = 1
"""The 1 mm template loads faster than the 2 mm one (nilearn resamples it)."""


def _check_counts(*, scale: float, **counts: int) -> None:
    """Refuse counts below their minimum (``workers``, ``sites`` and ``cases_per_site`` 1)."""
    for pname, val in counts.items():
        low = 0 if pname in ("test_cases", "unseen_cases") else 1
        if val < low:
            raise ConfigError(f"{pname} must be at least {low}, got {val}")
    if not scale > 0:
        raise ConfigError(f"scale must be positive, got {scale}")


def _training_jobs(
    out: Path, profiles: Sequence[ScannerProfile], sizes: Sequence[int], seed: int
) -> tuple[list[_Job], list[dict[str, Any]]]:
    """Write each training site's manifest; its case jobs and summary row."""
    jobs: list[_Job] = []
    site_rows: list[dict[str, Any]] = []
    for g, (prof, n) in enumerate(zip(profiles, sizes, strict=True)):
        ids = [f"{prof.name}-{i:03d}" for i in range(n)]
        _write_site_manifest(out / prof.name, prof.name, prof.format, prof.modalities, ids)
        jobs += [
            _Job(str(out / prof.name), prof.format, cid, subject_seed(seed, g, i), prof,
                 prof.modalities, prof.lesion_load, _TEMPLATE_RESOLUTION)
            for i, cid in enumerate(ids)
        ]
        site_rows.append(_site_row(prof, prof.name, n))
    return jobs, site_rows


def _central_jobs(
    out: Path, profiles: Sequence[ScannerProfile], n: int, seed: int
) -> tuple[list[_Job], dict[str, Any]]:
    """Write the central test set's manifest; its case jobs (every site's scanner in turn)."""
    ids = [f"central-{i:03d}" for i in range(n)]
    _write_site_manifest(out / "central-test", "central-test", "folder", MODALITIES, ids)
    jobs = []
    for i, cid in enumerate(ids):
        prof = profiles[i % len(profiles)]
        # The coordinator's test protocol acquires every modality on every scanner.
        jobs.append(_Job(str(out / "central-test"), "folder", cid,
                         subject_seed(seed, 10_000, i), prof, MODALITIES,
                         prof.lesion_load, _TEMPLATE_RESOLUTION))
    return jobs, {"path": "central-test", "cases": n, "scanners": [p.name for p in profiles]}


def _unseen_jobs(
    out: Path, unseen: ScannerProfile, n: int, seed: int
) -> tuple[list[_Job], dict[str, Any]]:
    """Write the unseen scanner's site manifest; its case jobs and summary row."""
    ids = [f"unseen-{i:03d}" for i in range(n)]
    _write_site_manifest(out / unseen.name, unseen.name, "folder", MODALITIES, ids)
    jobs = [
        _Job(str(out / unseen.name), "folder", cid, subject_seed(seed, 20_000, i), unseen,
             MODALITIES, unseen.lesion_load, _TEMPLATE_RESOLUTION)
        for i, cid in enumerate(ids)
    ]
    return jobs, _site_row(unseen, unseen.name, n)


def _site_row(prof: ScannerProfile, path: str, n: int) -> dict[str, Any]:
    return {
        "name": prof.name,
        "path": path,
        "format": prof.format,
        "cases": n,
        "spacing": [round(s, 4) for s in prof.spacing],
        "orientation": prof.orientation,
        "shape": list(prof.grid_shape()),
        "modalities": list(prof.modalities),
        "missing": [m for m in MODALITIES if m not in prof.modalities],
        "intensity_scale": prof.intensity_scale,
        "intensity_offset": prof.intensity_offset,
        "noise": f"{prof.noise} {prof.noise_level:g}",
        "bias_strength": prof.bias_strength,
        "lesion_load": prof.lesion_load,
    }


def _run_jobs(jobs: list[_Job], workers: int, progress: bool) -> list[dict[str, Any]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("generating cases", total=len(jobs))

        def done(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(task, advance=1, description=f"generating cases ({row['case_id']})")

        if workers == 1 or len(jobs) < 2:
            for job in jobs:
                done(_run_job(job))
        else:
            import multiprocessing as mp

            # spawn: never fork a parent that may hold threads (torch, Ray) or locks.
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for row in pool.map(_run_job, jobs):
                    done(row)
    return rows


POLICY_FILE = "site-policy.yaml"


def _write_config(out: Path, profiles: Sequence[ScannerProfile], central: bool,
                  unseen: str | None) -> Path:
    cfg: dict[str, Any] = {
        "name": "synthetic-brain-mri",
        "modalities": list(MODALITIES),
        "labels": dict(LABELS),
        "sites": [{"name": p.name, "path": p.name, "policy": f"{p.name}/{POLICY_FILE}"}
                  for p in profiles],
        "central_test": "central-test" if central else None,
        "unseen_sites": [unseen] if unseen else [],
        "preprocessing": default_preprocessing_section(),
        **default_training_sections(),
    }
    if not central:
        del cfg["central_test"]
    path = out / "federation.yaml"
    _write_yaml(path, cfg)
    _write_site_policies(out, [p.name for p in profiles], path)
    return path


def _write_site_policies(out: Path, sites: Sequence[str], config: Path) -> None:
    """Each generated site's policy: one that allows exactly the generated config's settings.

    So the demo exercises the same checks as a deployment (see ``docs/site-policy.md``).
    """
    from fedmed.config import load_config
    from fedmed.policy import policy_permitting

    cfg = load_config(config)
    for name in sites:
        policy = policy_permitting(cfg, site=name).model_dump(mode="json")
        _write_yaml(out / name / POLICY_FILE, policy)


def _verify(out: Path, profiles: Sequence[ScannerProfile], sizes: Sequence[int],
            test_cases: int, unseen_cases: int, unseen_name: str) -> None:
    """Load every written site back as the training code will; fail loudly if one is off."""
    from fedmed.config import load_config
    from fedmed.data.formats import load_site

    load_config(out / "federation.yaml")
    expect = [(out / p.name, p.format, n, tuple(m for m in MODALITIES if m not in p.modalities))
              for p, n in zip(profiles, sizes, strict=True)]
    if test_cases:
        expect.append((out / "central-test", "folder", test_cases, ()))
    if unseen_cases:
        expect.append((out / unseen_name, "folder", unseen_cases, ()))
    for site_dir, fmt, n, missing in expect:
        man = load_site(site_dir, expected_modalities=MODALITIES)
        bad = [c.case_id for c in man.cases if c.missing != missing]
        if man.format != fmt or len(man.cases) != n or man.problems or bad:
            raise DatasetFormatError(
                f"{site_dir}: generated site does not load back as expected (format "
                f"{man.format} vs {fmt}, {len(man.cases)} vs {n} cases, problems "
                f"{[p.message for p in man.problems]}, wrong missing modalities in {bad}); "
                "this is a bug in fedmed data synth"
            )


def federation_summary(root: Path) -> dict[str, Any]:
    """The ``synth.json`` summary written by :func:`generate_federation`.

    Raises:
        DatasetFormatError: ``root`` holds no summary.
    """
    path = Path(root) / SUMMARY_FILE
    if not path.is_file():
        raise DatasetFormatError(f"{path}: no synthetic federation summary here")
    return json.loads(path.read_text())


__all__ = [
    "CASES_PER_SITE",
    "LABELS",
    "MODALITIES",
    "ScannerProfile",
    "SyntheticSubject",
    "cohort_sizes",
    "default_preprocessing_section",
    "default_scanners",
    "default_training_sections",
    "federation_summary",
    "generate_federation",
    "simulate_subject",
    "subject_seed",
    "unseen_scanner",
]
