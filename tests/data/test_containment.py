"""One containment rule for every site layout: a case file must lie inside the site folder.

A symbolic link (or a manifest path) that resolves outside the site is a manifest problem
naming the file, and the file is left out of its case, so no reader ever opens it; a link
that stays inside the site is followed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmed.data.formats import load_site

# (layout, the member replaced by a link, its case, "image" or "label")
MEMBERS = [
    ("folder", "case_001/T2.nii.gz", "case_001", "image"),
    ("folder", "case_000/label.nii.gz", "case_000", "label"),
    ("nnunet", "imagesTr/FED_001_0001.nii.gz", "FED_001", "image"),
    ("nnunet", "labelsTr/FED_000.nii.gz", "FED_000", "label"),
    ("msd-split", "imagesTr/case_001_T2.nii.gz", "case_001", "image"),
    ("msd-split", "labelsTr/case_000.nii.gz", "case_000", "label"),
]


@pytest.fixture
def outside(tmp_path: Path, make_site: Callable[..., Path]) -> Path:
    """A valid scan outside every site: what an escaping link points to."""
    other = make_site(tmp_path / "other-hospital", "folder", n_cases=1)
    return other / "case_000" / "T2.nii.gz"


@pytest.mark.parametrize(
    ("fmt", "member", "case_id", "what"), MEMBERS, ids=[f"{m[0]}-{m[3]}" for m in MEMBERS]
)
def test_link_out_of_the_site_is_refused_in_every_layout(
    fmt: str,
    member: str,
    case_id: str,
    what: str,
    outside: Path,
    make_site: Callable[..., Path],
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path / "site", fmt, n_cases=2)
    link = site / member
    link.unlink()
    link.symlink_to(outside)
    m = load_site(site)
    problems = [(p.case_id, p.kind) for p in m.problems]
    assert problems == [(case_id, "path_escapes_site")]
    assert link.name in m.problems[0].file and str(outside) in m.problems[0].message
    case = m.case(case_id)
    if what == "image":
        assert case.missing == ("T2",)
    else:
        assert case.label is None
    every_file = [f for c in m.cases for f in c.files()]
    assert outside.resolve() not in every_file


def test_a_case_folder_linked_from_outside_is_refused(
    outside: Path, make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "site", "folder", n_cases=2)
    (site / "case_009").symlink_to(outside.parent, target_is_directory=True)
    m = load_site(site)
    escaped = {p.file for p in m.problems if p.kind == "path_escapes_site"}
    assert {Path(f).name for f in escaped} == {
        "T1.nii.gz",
        "T2.nii.gz",
        "FLAIR.nii.gz",
        "label.nii.gz",
    }
    assert not m.case("case_009").images and m.case("case_009").label is None


@pytest.mark.parametrize("fmt", ["folder", "nnunet", "msd-split"])
def test_a_link_inside_the_site_is_followed(
    fmt: str, make_site: Callable[..., Path], tmp_path: Path
) -> None:
    site = make_site(tmp_path / "site", fmt, n_cases=2)
    member = {
        "folder": "case_001/T2.nii.gz",
        "nnunet": "imagesTr/FED_001_0001.nii.gz",
        "msd-split": "imagesTr/case_001_T2.nii.gz",
    }[fmt]
    store = site / ".store" / "t2.nii.gz"  # hidden: not a case folder of its own
    store.parent.mkdir()
    shutil.move(site / member, store)
    (site / member).symlink_to(Path("..") / ".store" / "t2.nii.gz")  # relative, inside
    m = load_site(site)
    assert not m.problems
    case = next(c for c in m.cases if c.case_id in ("case_001", "FED_001"))
    assert case.images["T2"].path == store.resolve()
