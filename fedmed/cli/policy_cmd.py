"""`fedmed site policy init|show`: the hospital's site policy (see docs/site-policy.md)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="The site policy: what this hospital allows.")


@app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="Where to write the policy (YAML)."),
    site: str | None = typer.Option(None, "--site", help="A label for logs (the site's name)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a strict, commented default policy to review and adapt."""
    from rich.console import Console

    from fedmed.policy import write_default_policy

    path = write_default_policy(out, site=site, force=force)
    Console().print(
        f"wrote {path}: a strict default (DP and secure aggregation required, k = 10). "
        "Review it, then name it in the SuperNode's node config: policy='" + str(path) + "'",
        highlight=False, soft_wrap=True,
    )


@app.command("show")
def show(
    policy: Path = typer.Option(..., "--policy", help="The site policy (YAML)."),
) -> None:
    """Print every setting in force and where it came from (the file or the default)."""
    from rich.console import Console
    from rich.table import Table

    from fedmed.policy import policy_sources

    table = Table("setting", "value", "from")
    for key, value, source in policy_sources(policy):
        if key == "approved_apps":
            value = f"{len(value)} app bundle(s); `fedmed site approved` lists them"
        table.add_row(key, str(value), source)
    Console(width=160).print(table)
