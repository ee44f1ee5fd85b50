"""`fedmed data check`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `check` to the `fedmed data` app."""

    @app.command("check")
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
        max_megavoxels: float | None = typer.Option(
            None,
            "--max-megavoxels",
            min=0.0,
            help="Flag images larger than this many megavoxels per channel "
            "(default preprocessing.max_case_megavoxels, 64).",
        ),
        affine_tolerance_mm: float | None = typer.Option(
            None,
            "--affine-tolerance-mm",
            min=0.0,
            help="Largest allowed world-space displacement between a case's files "
            "(default preprocessing.affine_tolerance_mm, 1 mm).",
        ),
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
        from rich.table import Table

        from fedmed.config import PreprocessingConfig, load_config
        from fedmed.data.check import (
            FINGERPRINT_NAME,
            CheckSettings,
            check_site,
            fingerprint,
            write_fingerprint,
        )
        from fedmed.data.formats import load_site

        overrides = {
            "max_megavoxels": max_megavoxels,
            "affine_tolerance_mm": affine_tolerance_mm,
            "require_all_modalities": require_all_modalities,
        }
        if config is not None:
            cfg = load_config(config)
            settings = CheckSettings.from_config(cfg.preprocessing, **overrides)
            resolved = site_dir.resolve()
            name = next((n for n in cfg.site_names if cfg.site_dir(n) == resolved), None)
            manifest = load_site(site_dir, expected_modalities=cfg.modalities, name=name)
            report = check_site(manifest, cfg.labels, settings, cfg.modalities)
        else:
            settings = CheckSettings.from_config(PreprocessingConfig(), **overrides)
            manifest = load_site(site_dir)
            report = check_site(manifest, None, settings)

        console = Console(soft_wrap=False)
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

        fp_path = fingerprint_path or (manifest.root / FINGERPRINT_NAME)
        write_fingerprint(fingerprint(manifest, report), fp_path)
        if json_path is not None:
            from fedmed.errors import DatasetFormatError

            try:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(report.to_json() + "\n")
            except OSError as exc:
                raise DatasetFormatError(
                    f"--json {json_path}: cannot write the report ({exc}); choose a writable path"
                ) from None
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
