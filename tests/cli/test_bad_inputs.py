"""Bad inputs through the real CLI: every one is refused cleanly, naming what is wrong.

Each row runs ``fedmed.cli.main.main([...])`` on one bad input (a file, a folder, a config
or an option) and checks what a user sees: exit code 1 (invalid input) or 2 (usage), no
traceback, and the offending file or option named in the message. Rows whose input claims a
huge volume also check that the refusal allocated nothing near the claim (the process's
peak RSS grows by less than :data:`MAX_GROWTH_MB`). Volumes are 16^3; no row trains.
"""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from fedmed.cli.main import main
from tests.support import bad_images as bad

MAX_GROWTH_MB = 64.0
"""Largest peak-RSS growth a refused huge-header row may cause (its claim is 256 GB)."""
SPACING = [1.0, 1.2, 1.5]


@dataclass(frozen=True)
class Ctx:
    """What a row builds its input from.

    Attributes:
        tmp: the row's own folder.
        bases: valid sites (``folder``, ``nnunet``, ``msd-split``; 2 cases each) to copy.
        model: an untrained but valid ``model.pt`` (T1 + FLAIR, two labels).
        outside: a folder next to the sites holding a valid scan, ``secret.nii.gz``.
    """

    tmp: Path
    bases: dict[str, Path]
    model: Path
    outside: Path

    def site(self, fmt: str = "folder") -> Path:
        """A fresh copy of the valid ``fmt`` site."""
        dst = self.tmp / f"site-{fmt}"
        if not dst.exists():
            shutil.copytree(self.bases[fmt], dst, symlinks=True)
        return dst

    def config(self, site: Path, **extra: object) -> Path:
        """A federation config with ``site`` as its only site (spacing fixed: no fingerprint)."""
        import yaml

        data: dict[str, object] = {
            "name": "bad-inputs",
            "modalities": ["T1", "T2", "FLAIR"],
            "labels": {0: "background", 1: "tissue", 2: "lesion"},
            "sites": [{"name": "h1", "path": str(site)}],
            "preprocessing": {"target_spacing": SPACING, "patch_size": [16, 16, 16]},
            **extra,
        }
        path = self.tmp / "federation.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def link_outside(self, link: Path) -> Path:
        """Replace ``link`` by a symbolic link to the scan outside the site."""
        link.unlink(missing_ok=True)
        link.symlink_to(self.outside / "secret.nii.gz")
        return link


@dataclass(frozen=True)
class Row:
    """One bad input.

    Attributes:
        id: short name (the pytest id).
        command: the command as a user types it (for the report).
        build: writes the input; returns the argv and the names the message must contain.
        codes: acceptable exit codes.
        huge: the input claims a huge volume: peak RSS must not grow with it.
        marker: a file the input's code would create if it ever ran (must not exist).
    """

    id: str
    command: str
    build: Callable[[Ctx], tuple[list[str], list[str]]]
    codes: tuple[int, ...] = (1,)
    huge: bool = False
    marker: bool = field(default=False)


# -- builders ---------------------------------------------------------------------------------


NAN, INF = float("nan"), float("inf")
BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nan": (lambda p: bad.with_value(p, NAN), "NaN or infinite"),
    "inf": (lambda p: bad.with_value(p, INF), "NaN or infinite"),
    "minus-inf": (lambda p: bad.with_value(p, -INF), "NaN or infinite"),
    "huge-header": (bad.huge_header, "64000.0 megavoxels"),
    "zero-affine": (bad.zero_affine, "affine is singular"),
    "nan-affine": (bad.nan_affine, "NaN or infinite entries"),
    "parallel-axes": (bad.parallel_axes, "parallel"),
    "truncated-gzip": (bad.truncated, "corrupt or truncated"),
    "text-as-nifti": (bad.text_file, "not a NIfTI image"),
    "2d": (lambda p: bad.of_shape(p, (16, 16)), "expected a 3D image"),
    "5d": (lambda p: bad.of_shape(p, (16, 16, 16, 2, 2)), "expected a 3D image"),
    "complex": (lambda p: bad.of_shape(p, (16, 16, 16), np.complex64), "not a real scalar"),
    "label-fraction": (bad.fractional_label, "non-integer values"),
    "missing": (lambda p: p, "does not exist"),
}
"""Bad file kind -> (its writer, the words the refusal must contain)."""


def _bad_file(kind: str, path: Path) -> tuple[Path, str]:
    write, says = BAD_FILES[kind]
    return write(path), says


def check_file(kind: str, name: str = "T1.nii.gz") -> Row:
    """``data check`` of a folder site whose case_001/``name`` is a bad file of ``kind``."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        site = c.site()
        target, says = _bad_file(kind, site / "case_001" / name)
        return ["data", "check", str(site), "--json", str(c.tmp / "r.json")], [
            str(target),
            says,
        ]

    return Row(f"check-{kind}", "data check", build, huge=kind == "huge-header")


def preprocess_file(kind: str, name: str = "T1.nii.gz") -> Row:
    """``data preprocess`` of a folder site whose case_001/``name`` is a bad file."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        site = c.site()
        target, says = _bad_file(kind, site / "case_001" / name)
        argv = ["data", "preprocess", str(site), "-c", str(c.config(site))]
        return [*argv, "--cache-dir", str(c.tmp / "cache")], [str(target), says]

    return Row(f"preprocess-{kind}", "data preprocess", build, huge=kind == "huge-header")


def predict_file(kind: str) -> Row:
    """``predict`` of one bad T1 scan."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        target, says = _bad_file(kind, c.tmp / "scan" / "T1.nii.gz")
        argv = ["predict", "--model", str(c.model), "--image", f"T1={target}"]
        return [*argv, "--out", str(c.tmp / "mask.nii.gz")], [str(target), says]

    return Row(f"predict-{kind}", "predict", build, huge=kind == "huge-header")


def option(command: str, template: str) -> Row:
    """A command whose last option's value is refused at parse time; it must be named.

    Args:
        command: what the user typed, for the report (``"local --epochs 0"``).
        template: the argv, with ``{cfg}`` (a valid config), ``{site}`` (a valid site) and
            ``{out}`` (a new folder) filled in per row.
    """

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        site = c.site()
        argv = template.format(cfg=c.config(site), site=site, out=c.tmp / "o").split()
        return argv, [argv[-2]]

    *words, value = command.split()
    return Row("-".join(w.lstrip("-") for w in words) + "=" + value, command, build, (2,))


def escaping(fmt: str, member: str) -> Callable:
    """``data check`` of a ``fmt`` site whose ``member`` links to a scan outside the site."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        site = c.site(fmt)
        link = c.link_outside(site / member)
        return ["data", "check", str(site), "--json", str(c.tmp / "r.json")], [
            link.name,
            "outside the site folder",
        ]

    return build


def escaping_case_dir(c: Ctx) -> tuple[list[str], list[str]]:
    """A whole case folder that is a symbolic link to a folder outside the site."""
    site = c.site()
    (site / "case_009").symlink_to(c.outside, target_is_directory=True)
    (c.outside / "T1.nii.gz").write_bytes((site / "case_000" / "T1.nii.gz").read_bytes())
    return ["data", "check", str(site), "--json", str(c.tmp / "r.json")], [
        "case_009",
        "outside the site folder",
    ]


def duplicate_ids(c: Ctx) -> tuple[list[str], list[str]]:
    site = c.site("msd-split")
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"].append(dict(meta["training"][1]))
    (site / "dataset.json").write_text(json.dumps(meta))
    return ["data", "check", str(site), "--json", str(c.tmp / "r.json")], [
        "duplicate case id 'case_001'"
    ]


def empty_site(c: Ctx) -> tuple[list[str], list[str]]:
    (c.tmp / "empty").mkdir()
    return ["data", "check", str(c.tmp / "empty")], [str(c.tmp / "empty")]


def config_text(text: str) -> Callable:
    """``data preprocess`` with a config file holding ``text``."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        cfg = c.tmp / "federation.yaml"
        cfg.write_text(text)
        return ["data", "preprocess", str(c.site()), "-c", str(cfg)], [str(cfg)]

    return build


def unknown_key(c: Ctx) -> tuple[list[str], list[str]]:
    site = c.site()
    argv = ["data", "preprocess", str(site), "-c", str(c.config(site, bogus_key=1))]
    return argv, ["bogus_key"]


def model_file(write: Callable[[Ctx, Path], Path], command: str = "predict") -> Callable:
    """``predict`` (or ``export bundle``) with a bad ``model.pt``."""

    def build(c: Ctx) -> tuple[list[str], list[str]]:
        model = write(c, c.tmp / "run" / "model.pt")
        if command == "export":
            return ["export", "bundle", str(model.parent), str(c.tmp / "bundle")], [str(model)]
        scan = bad.of_shape(c.tmp / "T1.nii.gz", (16, 16, 16))
        argv = ["predict", "--model", str(model), "--image", f"T1={scan}"]
        return [*argv, "--out", str(c.tmp / "m.nii.gz")], [str(model)]

    return build


def evil(torch_zip: bool) -> Callable[[Ctx, Path], Path]:
    return lambda c, p: bad.code_running_pickle(p, c.tmp / "PWNED", torch_zip=torch_zip)


def policy_with(text: str | None) -> Callable:
    def build(c: Ctx) -> tuple[list[str], list[str]]:
        path = c.tmp / "site-policy.yaml"
        if text is not None:
            path.write_text(text)
        return ["site", "policy", "show", "--policy", str(path)], [str(path)]

    return build


def _cfg(c: Ctx) -> str:
    return str(c.config(c.site()))


ROWS: list[Row] = [
    # -- fedmed data check: the reader's rules and the layouts' containment rule
    *[check_file(kind) for kind in list(BAD_FILES)[:-2] if kind != "minus-inf"],
    check_file("label-fraction", "label.nii.gz"),
    Row("check-symlink-folder", "data check", escaping("folder", "case_001/T1.nii.gz")),
    Row("check-symlink-folder-label", "data check", escaping("folder", "case_000/label.nii.gz")),
    Row("check-symlink-case-dir", "data check", escaping_case_dir),
    Row("check-symlink-nnunet", "data check", escaping("nnunet", "imagesTr/FED_001_0000.nii.gz")),
    Row("check-symlink-nnunet-label", "data check", escaping("nnunet", "labelsTr/FED_000.nii.gz")),
    Row("check-symlink-msd", "data check", escaping("msd-split", "imagesTr/case_001_T1.nii.gz")),
    Row("check-duplicate-ids", "data check", duplicate_ids),
    Row("check-empty-site", "data check", empty_site),
    Row(
        "check-missing-site",
        "data check",
        lambda c: (["data", "check", str(c.tmp / "nowhere")], [str(c.tmp / "nowhere")]),
    ),
    # -- fedmed data preprocess: the same reader rules, no silent "fix"
    *[preprocess_file(kind) for kind in ("nan", "inf", "huge-header", "zero-affine")],
    preprocess_file("label-fraction", "label.nii.gz"),
    Row(
        "preprocess-missing-config",
        "data preprocess",
        lambda c: (
            ["data", "preprocess", str(c.site()), "-c", str(c.tmp / "none.yaml")],
            [str(c.tmp / "none.yaml")],
        ),
    ),
    Row("preprocess-config-not-yaml", "data preprocess", config_text("sites: [unclosed\n: :")),
    Row("preprocess-config-a-list", "data preprocess", config_text("- just\n- a list\n")),
    Row("preprocess-unknown-config-key", "data preprocess", unknown_key),
    # -- fedmed predict: the reader's rules on a hospital's scan, weights-only model files
    *[
        predict_file(kind)
        for kind in ("nan", "inf", "minus-inf", "huge-header", "zero-affine", "nan-affine")
    ],
    *[predict_file(kind) for kind in ("2d", "text-as-nifti", "missing")],
    Row("predict-model-pickle-runs-code", "predict", model_file(evil(False)), marker=True),
    Row("predict-model-torch-runs-code", "predict", model_file(evil(True)), marker=True),
    Row("predict-model-text", "predict", model_file(lambda c, p: bad.text_file(p))),
    Row("predict-model-missing", "predict", model_file(lambda c, p: p)),
    Row("export-model-runs-code", "export bundle", model_file(evil(True), "export"), marker=True),
    # -- numeric options, refused at parse time
    option("centralized --epochs 0", "centralized -c {cfg} -o {out} --epochs 0"),
    option("centralized --epochs -1", "centralized -c {cfg} -o {out} --epochs -1"),
    option("local --epochs 0", "local -c {cfg} --site h1 -o {out} --epochs 0"),
    option("local --epochs -1", "local -c {cfg} --site h1 -o {out} --epochs -1"),
    option("simulate --rounds 0", "simulate -c {cfg} -o {out} --rounds 0"),
    option("simulate --rounds -2", "simulate -c {cfg} -o {out} --rounds -2"),
    option("data synth --cases-per-site 0", "data synth --out {out} --cases-per-site 0"),
    option("data synth --sites -1", "data synth --out {out} --sites -1"),
    option("data synth --seed -1", "data synth --out {out} --seed -1"),
    option("data synth --scale nan", "data synth --out {out} --scale nan"),
    option("certs init --days 0", "certs init --out {out} --server-name x --days 0"),
    option("certs init --days 99999999", "certs init --out {out} --server-name x --days 99999999"),
    option("data check --max-megavoxels 0", "data check {site} --max-megavoxels 0"),
    option("data check --max-megavoxels nan", "data check {site} --max-megavoxels nan"),
    option("data check --affine-tolerance-mm -1", "data check {site} --affine-tolerance-mm -1"),
    Row(
        "local-unknown-site",
        "local --site nowhere",
        lambda c: (
            ["local", "-c", _cfg(c), "--site", "nowhere", "-o", str(c.tmp / "o")],
            ["nowhere"],
        ),
    ),
    Row(
        "simulate-unknown-strategy",
        "simulate --strategy bogus",
        lambda c: (
            ["simulate", "-c", _cfg(c), "-o", str(c.tmp / "o"), "--strategy", "bogus"],
            ["federation.strategy", "bogus"],
        ),
    ),
    Row(
        "compare-missing-config",
        "compare",
        lambda c: (
            ["compare", "-c", str(c.tmp / "none.yaml"), "-o", str(c.tmp / "o")],
            [str(c.tmp / "none.yaml")],
        ),
    ),
    # -- other commands' files
    Row(
        "privacy-no-ledger",
        "privacy report",
        lambda c: (["privacy", "report", str(c.tmp)], [str(c.tmp)]),
    ),
    Row("policy-missing", "site policy show", policy_with(None)),
    Row("policy-unknown-key", "site policy show", policy_with("bogus_section: {x: 1}\n")),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, make_site: Callable[..., Path]) -> dict:
    root = tmp_path_factory.mktemp("valid-sites")
    return {fmt: make_site(root / fmt, fmt, n_cases=2) for fmt in ("folder", "nnunet", "msd-split")}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid but untrained model file (predict must refuse the scans, not the model)."""
    from fedmed.data.planning import plan_preprocessing
    from fedmed.models import build_model
    from fedmed.training.checkpoint import save_model
    from tests.support.toy import toy_config

    tmp = tmp_path_factory.mktemp("model")
    cfg = toy_config(tmp)
    net = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    spacing = plan_preprocessing(cfg).target_spacing
    return save_model(tmp / "model.pt", net.state_dict(), cfg, spacing)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_cleanly(
    row: Row,
    bases: dict[str, Path],
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "100000")  # rich must not wrap a file name across lines
    outside = tmp_path / "outside"
    bad.of_shape(outside / "secret.nii.gz", (16, 16, 16))
    ctx = Ctx(tmp_path, bases, model, outside)
    argv, names = row.build(ctx)
    capsys.readouterr()
    before = _peak_rss_mb()
    rc = main(argv)
    growth = _peak_rss_mb() - before
    out = capsys.readouterr()
    report = tmp_path / "r.json"
    text = out.err + out.out + (report.read_text() if report.is_file() else "")
    # The report's table (shown with -s): the line that names the input.
    lines = [ln.strip() for ln in text.splitlines() if names[0] in ln] or [out.err.strip()]
    print(f"ROW | {row.id} | {row.command} | {rc} | {lines[0][:240]}")
    assert rc in row.codes, text
    assert "Traceback" not in text
    for name in names:
        assert name in text, f"{name!r} not named in:\n{text}"
    if row.huge:
        assert growth < MAX_GROWTH_MB, f"peak RSS grew by {growth:.0f} MB"
    if row.marker:
        assert not (tmp_path / "PWNED").exists(), "the model file's code ran"


def test_the_table_has_at_least_30_rows_over_many_commands() -> None:
    assert len(ROWS) >= 30
    assert len({r.command.split(" --")[0] for r in ROWS}) >= 10
    assert np.unique([r.id for r in ROWS]).size == len(ROWS)
