"""Coded concepts of segments: what a DICOM SEG says each label is.

A DICOM Segmentation describes every segment with a *category* and a *type*, each a coded
concept (code value, coding scheme, meaning). fedmed knows SNOMED CT codes for the brain
labels it ships (CSF, grey matter, white matter, lesion; the codes come from pydicom's code
dictionary, never typed in by hand); other label sets need a code table, a YAML or JSON file
that maps each label name to its codes::

    tumour:
      category: SCT:MorphologicallyAbnormalStructure     # a pydicom code keyword
      type: {value: "108369006", scheme: SCT, meaning: Neoplasm}

Label names match case-insensitively; an entry in the table wins over a built-in one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from fedmed.errors import ExportError


class CodeSpec(BaseModel):
    """One coded concept.

    Attributes:
        value: the code value (``"65216001"``).
        scheme: the coding scheme designator (``"SCT"``, ``"DCM"``).
        meaning: the code meaning (``"Cerebrospinal Fluid"``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: str
    scheme: str = "SCT"
    meaning: str

    @field_validator("value", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v


class SegmentCode(BaseModel):
    """The category and type of one label."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: CodeSpec
    type: CodeSpec

    @field_validator("category", "type", mode="before")
    @classmethod
    def _keyword(cls, v: Any) -> Any:
        return pydicom_code(v) if isinstance(v, str) else v


def pydicom_code(text: str) -> CodeSpec:
    """``"SCHEME:Keyword"`` (pydicom's code dictionary, e.g. ``"SCT:Lesion"``) as a code.

    Raises:
        ValueError: malformed text or a keyword pydicom does not know.
    """
    from pydicom.sr.codedict import codes

    scheme, sep, keyword = text.partition(":")
    if not sep or not scheme or not keyword:
        raise ValueError(
            f"{text!r}: write a code as SCHEME:Keyword (e.g. SCT:Lesion) or as "
            "{value, scheme, meaning}"
        )
    try:
        code = getattr(getattr(codes, scheme.strip()), keyword.strip())
    except AttributeError:
        raise ValueError(
            f"{text!r}: pydicom's code dictionary has no {keyword!r} in scheme {scheme!r}; "
            "give {value, scheme, meaning} instead"
        ) from None
    return CodeSpec(value=code.value, scheme=code.scheme_designator, meaning=code.meaning)


def builtin_codes() -> dict[str, SegmentCode]:
    """SNOMED CT codes of the brain labels fedmed's demo and synthetic data use, by name."""

    def code(category: str, kind: str) -> SegmentCode:
        return SegmentCode(category=pydicom_code(category), type=pydicom_code(kind))

    csf = code("SCT:BodySubstance", "SCT:CerebrospinalFluid")
    gm = code("SCT:AnatomicalStructure", "SCT:GrayMatter")
    wm = code("SCT:AnatomicalStructure", "SCT:WhiteMatter")
    lesion = code("SCT:MorphologicallyAbnormalStructure", "SCT:Lesion")
    names = {
        csf: ("csf", "cerebrospinal fluid"),
        gm: ("gm", "grey matter", "gray matter"),
        wm: ("wm", "white matter"),
        lesion: ("lesion", "lesions"),
    }
    return {alias: code for code, aliases in names.items() for alias in aliases}


def load_code_table(path: str | Path) -> dict[str, SegmentCode]:
    """Read a code table (YAML or JSON): label name -> ``{category, type}``.

    Raises:
        ExportError: missing or unreadable file, or an entry that is not a valid code.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"--codes {p}: file does not exist (a YAML or JSON code table)")
    try:
        raw = yaml.safe_load(p.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"--codes {p}: cannot read it as YAML or JSON ({exc})") from None
    if not isinstance(raw, Mapping):
        raise ExportError(
            f"--codes {p}: expected a mapping of label name -> {{category, type}}, "
            f"got {type(raw).__name__}"
        )
    table: dict[str, SegmentCode] = {}
    for name, entry in raw.items():
        try:
            table[str(name).strip().lower()] = SegmentCode.model_validate(entry)
        except (ValidationError, ValueError) as exc:
            raise ExportError(f"--codes {p}: entry {name!r} is not a valid code: {exc}") from None
    return table


def segment_codes(
    labels: Mapping[int, str], table: Mapping[str, SegmentCode] | None = None
) -> dict[int, SegmentCode]:
    """The codes of every foreground label (label 0, the background, gets none).

    Args:
        labels: label value -> name (the model's labels).
        table: a user code table (:func:`load_code_table`); wins over the built-in codes.

    Raises:
        ExportError: a label has no code; the message lists them and how to add a table.
    """
    known = {**builtin_codes(), **{k.lower(): v for k, v in (table or {}).items()}}
    out: dict[int, SegmentCode] = {}
    missing = []
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        code = known.get(name.strip().lower())
        if code is None:
            missing.append(name)
        else:
            out[value] = code
    if missing:
        raise ExportError(
            f"no DICOM code for labels {missing}: fedmed knows CSF, grey matter, white matter "
            "and lesion; give a code table with --codes FILE (YAML/JSON: NAME: {category: "
            "SCT:Keyword, type: {value: CODE, scheme: SCT, meaning: TEXT}})"
        )
    return out
