"""`fedmed certs ...` commands: TLS certificates and site keys."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True)


@app.command("init")
def init(
    out: Path = typer.Option(
        ..., "--out", help="Directory for ca.crt/ca.key/server.pem/server.key."
    ),
    server_name: str = typer.Option(
        ..., "--server-name", help="Host name or IP the SuperNodes use to reach the SuperLink."
    ),
    san: list[str] = typer.Option(
        [],
        "--san",
        help="Extra subjectAltName (DNS name or IP), repeatable. Add 127.0.0.1 when the "
        "SuperLink runs the ServerApp in a subprocess (the default).",
    ),
    days: int = typer.Option(365, "--days", min=1, max=36500, help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Create the federation CA and the coordinator's (SuperLink's) TLS certificate."""
    from fedmed.security.certs import init_ca_and_server

    paths = init_ca_and_server(out, server_name, san, days, force=force)
    console = Console()
    console.print(f"CA certificate      {paths.ca_cert}  (give to every site and flwr user)")
    console.print(f"CA private key      {paths.ca_key}  (0600; keep offline)")
    console.print(f"SuperLink cert      {paths.server_cert}")
    console.print(f"SuperLink key       {paths.server_key}  (0600)")
    console.print(
        "Start the SuperLink with: flower-superlink "
        f"--ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.server_cert} "
        f"--ssl-keyfile {paths.server_key} --enable-supernode-auth "
        "--disable-runtime-dependency-installation --host 0.0.0.0 --port 8000",
        highlight=False,
        soft_wrap=True,
    )


@app.command("site")
def site(
    name: str = typer.Option(..., "--name", help="Site (hospital) name."),
    out: Path = typer.Option(..., "--out", help="Directory for NAME and NAME.pub."),
    connection: str = typer.Option(
        "fedmed", "--connection", help="flwr config SuperLink connection the coordinator uses."
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Create a site's SuperNode authentication key pair and print how to register it."""
    import shlex

    from fedmed.security.certs import create_site_keys, registration_command

    paths = create_site_keys(out, name, force=force)
    console = Console()
    console.print(f"private key  {paths.private_key}  (0600; stays at the site)")
    console.print(f"public key   {paths.public_key}  (send to the coordinator)")
    console.print("The coordinator registers it on its own host (Flower 1.42, Control API):")
    console.print(
        "  " + shlex.join(registration_command(paths.public_key, name, connection)),
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"The site starts its SuperNode with --auth-supernode-private-key {paths.private_key}",
        highlight=False,
        soft_wrap=True,
    )
