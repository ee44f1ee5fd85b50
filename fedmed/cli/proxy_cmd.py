"""`fedmed proxy config`: the nginx config of the coordinator's public address."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True)


@app.command("config")
def config(
    certs: Path = typer.Option(
        ..., "--certs",
        help="Folder with server.pem, server.key and ca.crt (`fedmed certs init --out`), as "
        "nginx will see it.",
    ),
    server_name: str = typer.Option(
        ..., "--server-name", help="The name hospitals use for the coordinator (on the cert)."
    ),
    out: Path = typer.Option(..., "--out", help="The nginx.conf to write."),
    listen: str = typer.Option(
        "0.0.0.0:443", "--listen", help="Public HOST:PORT (hospitals' --superlink)."
    ),
    upstream: str = typer.Option(
        "127.0.0.1:8000", "--upstream", help="The SuperLink's internal HOST:PORT."
    ),
    upstream_name: str = typer.Option(
        "localhost", "--upstream-name",
        help="A DNS name on the SuperLink's certificate (`superlink` in compose).",
    ),
    state_dir: Path = typer.Option(
        Path("/var/lib/fedmed-proxy"), "--state-dir",
        help="Writable folder for nginx's pid file, logs and temporary files (absolute).",
    ),
    logs: str = typer.Option(
        "files", "--logs", help="files (in --state-dir) or stdio (stderr/stdout: containers)."
    ),
    in_container: bool = typer.Option(
        False, "--in-container",
        help="The paths are those inside the proxy's container: do not check them here.",
    ),
) -> None:
    """Write an nginx config that serves only Flower's Fleet API on the public address."""
    from fedmed.security.proxy import load_proxy_settings, nginx_command, write_nginx_config

    settings = load_proxy_settings(
        listen=listen, server_name=server_name, server_cert=certs / "server.pem",
        server_key=certs / "server.key", upstream=upstream, upstream_ca=certs / "ca.crt",
        upstream_name=upstream_name, state_dir=state_dir, logs=logs,
    )
    path = write_nginx_config(settings, out, check_files=not in_container)
    console = Console()
    console.print(f"wrote {path}: public {listen} -> Fleet API only -> {upstream}",
                  highlight=False, soft_wrap=True)
    if not in_container:
        command = " ".join(nginx_command(path)[:-2]) + " -g 'daemon off;'"
        console.print(f"run it with: {command}", highlight=False, soft_wrap=True)
