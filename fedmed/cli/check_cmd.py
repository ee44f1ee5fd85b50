"""`fedmed data check`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from fedmed.cli.params import positive_float

if TYPE_CHECKING:
    from rich.console import Console

    from fedmed.data.check import SiteReport
    from fedmed.data.formats import SiteManifest


# Both must be positive and finite: refused at parse time (exit 2) otherwise.
_MAX_MEGAVOXELS = typer.Option(
    None,
    "--max-megavoxels",
    click_type=positive_float(),
    help="Refuse images whose header claims more megavoxels per channel, before reading "
    "them (default preprocessing.max_case_megavoxels, 64).",
)
_AFFINE_TOLERANCE = typer.Option(
    None,
    "--affine-tolerance-mm",
    click_type=positive_float(),
    help="Largest allowed world-space displacement between a case's files "
    "(default preprocessing.affine_tolerance_mm, 1 mm).",
)


def register(app: typer.Typer) -> None:
    """Add `check` to the `fedmed data` app."""
    app.command("check")(check)


def check(
    site_dir: Path = typer.Argument(
        ..., help="The site folder (MSD, nnU-Net v2 or folder-per-case)."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the per-case report as JSON to this file."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Federation config: its modalities, labels and preprocessing thresholds are "
        "checked against (default: the site's own declaration).",
    ),
    fingerprint_path: Path | None = typer.Option(
        None,
        "--fingerprint",
        help="Where to write the shareable fingerprint (default SITE_DIR/fingerprint.json).",
    ),
    policy: Path | None = typer.Option(
        None,
        "--policy",
        help="The site policy: its reporting.min_cases_per_metric (k) decides whether the "
        "fingerprint may carry statistics (default: the strict default policy, k = 10).",
    ),
    max_megavoxels: float | None = _MAX_MEGAVOXELS,
    affine_tolerance_mm: float | None = _AFFINE_TOLERANCE,
    require_all_modalities: bool = typer.Option(
        False,
        "--require-all-modalities",
        help="Treat a federation modality the site does not provide as an error.",
    ),
) -> None:
    """Check every case of a site and write its fingerprint (aggregates only).

    Exit 0 when every case is valid, 1 otherwise.
    """
    from rich.console import Console
    from rich.markup import escape

    from fedmed.data.fingerprint import FINGERPRINT_NAME, build_fingerprint, write_fingerprint
    from fedmed.policy import SitePolicy, load_policy

    k = (load_policy(policy) if policy is not None else SitePolicy()).reporting.min_cases_per_metric

    overrides = {
        "max_megavoxels": max_megavoxels,
        "affine_tolerance_mm": affine_tolerance_mm,
        "require_all_modalities": require_all_modalities,
    }
    manifest, report = _run_checks(site_dir, config, overrides)
    console = Console(soft_wrap=False)
    _print_report(console, report)
    fp_path = fingerprint_path or (manifest.root / FINGERPRINT_NAME)
    fp = build_fingerprint(manifest, report, min_cases=k)
    write_fingerprint(fp, fp_path)
    if "withheld" in fp:
        console.print(f"fingerprint: {fp['withheld']}", highlight=False)
    if json_path is not None:
        _write_json(report, json_path)
    console.print(
        escape(
            f"{report.num_valid}/{len(report.cases)} cases valid; fingerprint: {fp_path}"
            + (f"; report: {json_path}" if json_path is not None else "")
        ),
        highlight=False,
    )
    if not report.valid:
        from fedmed.errors import FedMedError

        # An error (not typer.Exit) so that `fedmed.cli.main.main()` returns 1: it turns
        # FedMedError into exit code 1, while click swallows Exit's code in
        # non-standalone mode.
        bad = len(report.cases) - report.num_valid
        raise FedMedError(
            f"site {report.site}: {bad} of {len(report.cases)} case(s) invalid"
            + (f" and {len(report.problems)} site problem(s)" if report.problems else "")
            + "; fix the files listed above (or exclude those cases) and re-run "
            "`fedmed data check`"
        )


def _run_checks(
    site_dir: Path, config: Path | None, overrides: dict[str, Any]
) -> tuple[SiteManifest, SiteReport]:
    """List the site and check it, against the federation config when one is given."""
    from fedmed.config import PreprocessingConfig, load_config
    from fedmed.data.check import CheckSettings, check_site
    from fedmed.data.formats import load_site

    if config is None:
        settings = CheckSettings.from_config(PreprocessingConfig(), **overrides)
        manifest = load_site(site_dir)
        return manifest, check_site(manifest, None, settings)
    cfg = load_config(config)
    settings = CheckSettings.from_config(cfg.preprocessing, **overrides)
    resolved = site_dir.resolve()
    name = next((n for n in cfg.site_names if cfg.site_dir(n) == resolved), None)
    manifest = load_site(site_dir, expected_modalities=cfg.modalities, name=name)
    return manifest, check_site(manifest, cfg.labels, settings, cfg.modalities)


def _print_report(console: Console, report: SiteReport) -> None:
    """One table row per case (status and problems), then the site-level problems."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=escape(f"site {report.site} ({report.format}, {len(report.cases)} cases)"),
        show_lines=False,
    )
    table.add_column("case", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("problems", overflow="fold")
    colour = {"valid": "green", "warning": "yellow", "invalid": "red"}
    for case in report.cases:
        # Escaped: messages hold "[...]" (kinds, label lists) that rich would eat as markup.
        problems = "\n".join(escape(f"[{p.kind.value}] {p.message}") for p in case.problems)
        table.add_row(
            escape(case.case_id),
            f"[{colour[case.status]}]{case.status}[/]",
            problems or "-",
        )
    console.print(table, highlight=False)
    for p in report.problems:
        console.print(f"[red]site problem:[/] {escape(p.message)}", highlight=False)


def _write_json(report: SiteReport, json_path: Path) -> None:
    """The per-case report as JSON (``--json``)."""
    from fedmed.errors import DatasetFormatError

    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(report.to_json() + "\n")
    except OSError as exc:
        raise DatasetFormatError(
            f"--json {json_path}: cannot write the report ({exc}); choose a writable path"
        ) from None
