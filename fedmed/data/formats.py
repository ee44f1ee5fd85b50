"""Site dataset formats, detected automatically.

Three layouts are understood:

* ``msd``: Medical Segmentation Decathlon -- ``dataset.json`` with ``modality`` and
  ``training: [{image, label}]``; an image is one 4D file (channels last, in ``modality``
  order) or, as an extension, a mapping ``{modality: path}`` / a list of paths.
* ``nnunet``: nnU-Net v2 raw -- ``dataset.json`` with ``channel_names``, ``labels``
  (name -> value) and ``file_ending``; ``imagesTr/CASE_0000.nii.gz`` per channel and
  ``labelsTr/CASE.nii.gz``.
* ``folder``: one folder per case -- ``SITE/CASE/<modality>.nii.gz`` and
  ``SITE/CASE/label.nii.gz``; an optional ``site.yaml`` names ``modalities`` and ``labels``.

Loading never stops at a bad case: manifest problems (missing files, duplicate case ids,
paths that escape the site folder) are collected in :attr:`SiteManifest.problems` for
``fedmed data check`` to report; only an unrecognisable folder raises. Every layout applies
one containment rule (:func:`_inside`): a case file, after resolving symbolic links and
``..``, must lie inside the site folder; one that does not is left out of its case (never
read) and recorded as a ``path_escapes_site`` problem naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedmed.data.io import IMAGE_SUFFIXES, image_suffix
from fedmed.errors import DatasetFormatError

FormatName = Literal["msd", "nnunet", "folder"]
ManifestProblemKind = Literal[
    "duplicate_case", "path_escapes_site", "unexpected_modality", "manifest"
]
LABEL_STEM = "label"


@dataclass(frozen=True)
class ModalityFile:
    """Where one modality of a case lives: a file, and the channel index for 4D files."""

    path: Path
    channel: int | None = None


@dataclass(frozen=True)
class Case:
    """One patient's scans.

    Attributes:
        case_id: unique within the site.
        images: modality name -> file (only the modalities this case has).
        label: the label map, or ``None`` for unlabelled cases.
        missing: modalities the federation expects that this case lacks.
    """

    case_id: str
    images: Mapping[str, ModalityFile]
    label: Path | None
    missing: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        """Every distinct file of the case (images, then label)."""
        out: list[Path] = []
        for mf in self.images.values():
            if mf.path not in out:
                out.append(mf.path)
        if self.label is not None:
            out.append(self.label)
        return out


@dataclass(frozen=True)
class ManifestProblem:
    """A problem found while listing a site (before any image is read).

    Attributes:
        case_id: the case it concerns (``#<index>`` for a manifest entry without an id).
        file: the file or manifest path concerned (``""`` when none).
        message: what is wrong and how to fix it.
        kind: machine-readable type, so that ``fedmed data check`` can classify it without
            parsing the message.
    """

    case_id: str
    file: str
    message: str
    kind: ManifestProblemKind = "manifest"


@dataclass(frozen=True)
class SiteManifest:
    """A site folder listed: format, declared modalities and labels, and its cases."""

    name: str
    root: Path
    format: FormatName
    modalities: tuple[str, ...]
    labels: dict[int, str]
    cases: tuple[Case, ...]
    problems: tuple[ManifestProblem, ...] = field(default=())

    def case(self, case_id: str) -> Case:
        """The case called ``case_id``."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise DatasetFormatError(f"site {self.name}: no case {case_id!r}")


def detect_format(site_dir: Path) -> FormatName:
    """Which layout ``site_dir`` is in.

    Raises:
        DatasetFormatError: the folder is missing or matches no supported layout.
    """
    if not site_dir.is_dir():
        raise DatasetFormatError(f"{site_dir}: site folder does not exist")
    ds = site_dir / "dataset.json"
    if ds.is_file():
        meta = _read_json(ds)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta or "training" in meta:
            return "msd"
        raise DatasetFormatError(
            f"{ds}: neither an MSD dataset.json (needs 'modality' and 'training') nor an "
            "nnU-Net v2 one (needs 'channel_names', 'labels', 'file_ending')"
        )
    if any(_case_dirs(site_dir)):
        return "folder"
    raise DatasetFormatError(
        f"{site_dir}: no dataset.json and no case folders with image files; expected an MSD or "
        "nnU-Net v2 dataset, or one folder per case holding <modality>.nii.gz and label.nii.gz"
    )


def load_site(
    site_dir: str | Path,
    expected_modalities: Sequence[str] | None = None,
    name: str | None = None,
) -> SiteManifest:
    """List a site's cases in any supported layout.

    Args:
        site_dir: the site folder.
        expected_modalities: the federation's modalities; a case lacking one records it in
            :attr:`Case.missing`. Names match case-insensitively and are reported in the
            federation's spelling. Default: the site's own declared modalities.
        name: site name; default the folder name (or ``site.yaml``'s ``name``).

    Returns:
        The manifest, with per-case problems collected rather than raised.

    Raises:
        DatasetFormatError: the folder is not in a supported layout.
    """
    root = Path(site_dir).resolve()
    fmt = detect_format(root)
    loader = {"msd": _load_msd, "nnunet": _load_nnunet, "folder": _load_folder}[fmt]
    site_name, modalities, labels, raw_cases, problems = loader(root)
    expected = tuple(expected_modalities) if expected_modalities else modalities
    canon = {m.lower(): m for m in expected}
    cases: list[Case] = []
    seen: set[str] = set()
    for case_id, images, label in raw_cases:
        if case_id in seen:
            problems.append(
                ManifestProblem(
                    case_id,
                    "",
                    f"duplicate case id {case_id!r}; rename one of them",
                    "duplicate_case",
                )
            )
            continue
        seen.add(case_id)
        mapped = {canon.get(m.lower(), m): f for m, f in images.items()}
        extra = [m for m in mapped if m not in expected]
        for m in extra:
            problems.append(
                ManifestProblem(
                    case_id,
                    str(mapped[m].path),
                    f"modality {m!r} is not one the federation expects ({list(expected)}); "
                    "rename it or add it to the config's modalities",
                    "unexpected_modality",
                )
            )
        # In the federation's order, so that iterating a case's images gives channel order.
        mapped = {m: mapped[m] for m in expected if m in mapped}
        missing = tuple(m for m in expected if m not in mapped)
        cases.append(Case(case_id, mapped, label, missing))
    return SiteManifest(
        name=name or site_name or root.name,
        root=root,
        format=fmt,
        modalities=tuple(canon.get(m.lower(), m) for m in modalities),
        labels=labels,
        cases=tuple(cases),
        problems=tuple(problems),
    )


RawCase = tuple[str, dict[str, ModalityFile], "Path | None"]
Loaded = tuple["str | None", tuple[str, ...], dict[int, str], list[RawCase], list[ManifestProblem]]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _inside(
    root: Path, path: str | Path, case_id: str, problems: list[ManifestProblem]
) -> Path | None:
    """The containment rule of every layout: a case file must lie inside the site folder.

    Args:
        root: the site folder (resolved).
        path: the file as the layout names it: relative to ``root`` (a manifest entry) or
            a path found under ``root`` (possibly a symbolic link).
        case_id: the case it belongs to (for the problem).
        problems: where a refusal is recorded.

    Returns:
        The file with every symbolic link and ``..`` resolved, which is what is read from
        then on; ``None`` (and a ``path_escapes_site`` problem naming the file) when that
        lies outside ``root``, so that no reader ever opens it.
    """
    resolved = (root / path).resolve()
    if resolved.is_relative_to(root):
        return resolved
    problems.append(
        ManifestProblem(
            case_id,
            str(path),
            f"{str(path)!r} resolves to {resolved}, outside the site folder {root}; a site may "
            "only use files inside its folder: copy the file into the site (a symbolic link "
            "or a manifest path that leaves the site is refused)",
            "path_escapes_site",
        )
    )
    return None


def _int_labels(raw: Mapping[str, Any], source: Path, name_to_value: bool) -> dict[int, str]:
    out: dict[int, str] = {}
    for k, v in raw.items():
        key, val = (v, k) if name_to_value else (k, v)
        if isinstance(key, list | tuple):  # nnU-Net region labels: not supported
            raise DatasetFormatError(f"{source}: region-based label {val!r} is not supported")
        try:
            out[int(key)] = str(val)
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{source}: label value {key!r} is not an integer") from None
    return dict(sorted(out.items()))


def _case_id_from(path_str: str) -> str:
    name = Path(path_str).name
    for suf in IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def _load_msd(root: Path) -> Loaded:
    ds = root / "dataset.json"
    meta = _read_json(ds)
    modality = meta.get("modality") or {"0": "image"}
    modalities = tuple(str(modality[k]) for k in sorted(modality, key=lambda s: int(s)))
    labels = _int_labels(meta.get("labels", {"0": "background"}), ds, name_to_value=False)
    problems: list[ManifestProblem] = []
    cases: list[RawCase] = []
    entries = meta.get("training")
    if not isinstance(entries, list):
        raise DatasetFormatError(f"{ds}: 'training' must be a list of {{image, label}} entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry:
            problems.append(ManifestProblem(f"#{i}", str(ds), "training entry without 'image'"))
            continue
        img = entry["image"]
        # A malformed entry (empty list, non-string paths) is one bad case, not a crash.
        if isinstance(img, dict):
            paths = list(img.values())
        elif isinstance(img, list | tuple):
            paths = list(img)
        else:
            paths = [img]
        if not paths or not all(isinstance(x, str) for x in paths):
            problems.append(
                ManifestProblem(
                    f"#{i}",
                    str(ds),
                    f"training entry {i}: 'image' must be a path, a list of "
                    f"paths or {{modality: path}}, got {img!r}",
                )
            )
            continue
        case_id = str(entry.get("case_id") or _case_id_from(paths[0]))
        images: dict[str, ModalityFile] = {}
        if isinstance(img, str):
            p = _inside(root, img, case_id, problems)
            if p is not None:
                multi = len(modalities) > 1
                images = {
                    m: ModalityFile(p, c if multi else None) for c, m in enumerate(modalities)
                }
        else:
            pairs = img.items() if isinstance(img, dict) else zip(modalities, img, strict=False)
            for m, rel in pairs:
                p = _inside(root, rel, case_id, problems)
                if p is not None:
                    images[str(m)] = ModalityFile(p)
        label = None
        if isinstance(entry.get("label"), str) and entry["label"]:
            label = _inside(root, entry["label"], case_id, problems)
        cases.append((case_id, images, label))
    return meta.get("name"), modalities, labels, cases, problems


def _load_nnunet(root: Path) -> Loaded:
    ds = root / "dataset.json"
    meta = _read_json(ds)
    for key in ("channel_names", "labels"):
        if key not in meta:
            raise DatasetFormatError(f"{ds}: nnU-Net v2 dataset.json needs {key!r}")
    channels = meta["channel_names"]
    modalities = tuple(str(channels[k]) for k in sorted(channels, key=lambda s: int(s)))
    labels = _int_labels(meta["labels"], ds, name_to_value=True)
    ending = str(meta.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    problems: list[ManifestProblem] = []
    by_case: dict[str, dict[str, ModalityFile]] = {}
    if images_dir.is_dir():
        for f in sorted(images_dir.iterdir()):
            if not f.name.endswith(ending):
                continue
            stem = f.name[: -len(ending)]
            case_id, _, chan = stem.rpartition("_")
            if not case_id or len(chan) != 4 or not chan.isdigit():
                problems.append(
                    ManifestProblem(stem, str(f), "nnU-Net image name must end in _XXXX (channel)")
                )
                continue
            c = int(chan)
            if c >= len(modalities):
                problems.append(
                    ManifestProblem(case_id, str(f), f"channel {c} not in channel_names")
                )
                continue
            inside = _inside(root, f, case_id, problems)
            images = by_case.setdefault(case_id, {})
            if inside is not None:
                images[modalities[c]] = ModalityFile(inside)
    # A label without images is a case whose images are missing.
    if labels_dir.is_dir():
        for f in sorted(labels_dir.iterdir()):
            if f.name.endswith(ending):
                by_case.setdefault(f.name[: -len(ending)], {})
    cases: list[RawCase] = []
    for case_id in sorted(by_case):
        lab = _inside(root, labels_dir / f"{case_id}{ending}", case_id, problems)
        cases.append((case_id, by_case[case_id], lab))
    return meta.get("name"), modalities, labels, cases, problems


def _case_dirs(root: Path) -> Iterable[Path]:
    for d in sorted(root.iterdir()):
        if (
            d.is_dir()
            and not d.name.startswith(".")
            and any(image_suffix(f) in IMAGE_SUFFIXES for f in d.iterdir())
        ):
            yield d


def _load_folder(root: Path) -> Loaded:
    site_yaml = root / "site.yaml"
    declared: dict[str, Any] = {}
    if site_yaml.is_file():
        try:
            declared = yaml.safe_load(site_yaml.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DatasetFormatError(f"{site_yaml}: not valid YAML ({exc})") from None
    cases: list[RawCase] = []
    found: list[str] = []
    problems: list[ManifestProblem] = []
    for d in _case_dirs(root):
        images: dict[str, ModalityFile] = {}
        label = d / "label.nii.gz"  # named even when absent: reported as missing
        for f in sorted(d.iterdir()):
            if image_suffix(f) not in IMAGE_SUFFIXES:
                continue
            stem = _case_id_from(f.name)
            if stem.lower() == LABEL_STEM:
                label = f
            else:
                if stem not in found:
                    found.append(stem)
                inside = _inside(root, f, d.name, problems)
                if inside is not None:
                    images[stem] = ModalityFile(inside)
        cases.append((d.name, images, _inside(root, label, d.name, problems)))
    modalities = tuple(declared.get("modalities") or found)
    labels = (
        _int_labels(declared["labels"], site_yaml, name_to_value=False)
        if "labels" in declared
        else {}
    )
    return declared.get("name"), modalities, labels, cases, problems
