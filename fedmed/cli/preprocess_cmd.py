"""`fedmed data preprocess`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `preprocess` to the `fedmed data` app."""

    @app.command("preprocess")
    def preprocess(
        site_dir: Path = typer.Argument(
            ..., help="The site folder (or the central test / unseen-site folder)."
        ),
        config: Path = typer.Option(..., "--config", "-c", help="The federation config (YAML)."),
        site: str | None = typer.Option(
            None, "--site", help="Site name (default: the folder's name)."
        ),
        cache_dir: Path | None = typer.Option(
            None,
            "--cache-dir",
            help="Cache folder (default: the config's preprocessing.cache_dir, else "
            "SITE_DIR/.fedmed-cache).",
        ),
    ) -> None:
        """Preprocess every case of a site into the on-disk cache (RAS, spacing, normalised)."""
        from rich.console import Console
        from rich.markup import escape

        from fedmed.config import load_config
        from fedmed.data.cache import preprocess_site
        from fedmed.data.formats import load_site
        from fedmed.data.planning import plan_preprocessing
        from fedmed.errors import PreprocessingError

        console = Console()
        cfg = load_config(config)
        settings = plan_preprocessing(cfg)
        manifest = load_site(site_dir, expected_modalities=cfg.modalities, name=site)
        if cfg.preprocessing.target_spacing is None:
            console.print(
                "target spacing planned from the sites' fingerprints: "
                f"{_fmt(settings.target_spacing)} mm"
            )
        summary = preprocess_site(manifest, settings, cache_dir=cache_dir, progress=True)
        console.print(f"site [bold]{summary.site}[/] ({manifest.format}, {manifest.root})")
        console.print(
            f"  cases: {summary.cases}  cached already: {summary.hits}  preprocessed now: "
            f"{summary.misses}  failed: {len(summary.failed)}  unlabelled: {summary.unlabelled}"
        )
        console.print(
            f"  output: {summary.orientation}, spacing {_fmt(summary.spacing)} mm, "
            f"{len(settings.modalities)} channels {list(settings.modalities)}"
        )
        if summary.min_shape is not None:
            console.print(f"  shapes: {summary.min_shape} .. {summary.max_shape}")
        missing = {m: n for m, n in summary.missing_channels.items() if n}
        if missing:
            console.print(f"  missing modalities (zero channels): {missing}")
        console.print(f"  cache: {summary.cache_dir}")
        console.print(f"  time: {summary.seconds:.1f} s")
        if summary.failed:
            for case_id, message in summary.failed:
                console.print(f"  [red]failed[/] {escape(case_id)}: {escape(message)}",
                              highlight=False)
            raise PreprocessingError(
                f"{len(summary.failed)} of {summary.cases} cases of {summary.site} could not be "
                "preprocessed (listed above); run `fedmed data check` on the site and fix or "
                "remove them"
            )


def _fmt(spacing: tuple[float, float, float]) -> str:
    return " x ".join(f"{s:g}" for s in spacing)
