"""Fixtures of the data-plane tests: valid sites to corrupt, and a counting image reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import fedmed.data.preprocess as pp


@pytest.fixture(scope="session")
def valid_sites(
    tmp_path_factory: pytest.TempPathFactory, make_site: Callable[..., Path]
) -> dict[str, Path]:
    """Valid sites (6-case folder-per-case, 6-case MSD with per-modality files, 3-case 4D MSD),
    written once; tests copy them before changing anything."""
    base = tmp_path_factory.mktemp("valid-sites")
    return {
        "folder": make_site(base / "hospital-a", "folder", n_cases=6),
        "msd-split": make_site(base / "hospital-b", "msd-split", n_cases=6),
        "msd": make_site(base / "hospital-c", "msd", n_cases=3),
    }


@pytest.fixture
def counting_reader(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Count calls to the image reader the preprocessing uses (the list of paths read)."""
    calls: list[Path] = []
    real = pp.read_image

    def reader(path, **kwargs):
        calls.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(pp, "read_image", reader)
    return calls
