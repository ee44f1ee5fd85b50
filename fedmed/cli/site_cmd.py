"""`fedmed site ...`: what a hospital decides (its policy, approved app bundles), its executor."""

from __future__ import annotations

import getpass
import logging
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedmed.cli import policy_cmd

app = typer.Typer(no_args_is_help=True)
app.add_typer(policy_cmd.app, name="policy")

_POLICY = typer.Option(..., "--policy", help="The site policy (YAML) of this hospital.")


@app.command("approve")
def approve(
    bundle: str = typer.Argument(
        ...,
        metavar="FAB_FILE_OR_HASH",
        help="The reviewed app bundle: a .fab file (`flwr build`), the app directory the "
        "coordinator runs `flwr run` on, or its SHA-256 (64 hex digits).",
    ),
    policy: Path = _POLICY,
    by: str = typer.Option(
        None, "--by", help="Who approves it (recorded); default: this account's user name."
    ),
    note: str = typer.Option("", "--note", help="Free text kept with the approval."),
) -> None:
    """Approve an app bundle: its ClientApp may then run next to this site's data."""
    from fedmed.policy import approve_app
    from fedmed.security.approval import fab_hash

    digest = fab_hash(bundle)
    approve_app(policy, digest, by or getpass.getuser(), note)
    Console().print(f"approved {digest}\n  in {policy}", highlight=False, soft_wrap=True)


@app.command("approved")
def approved(policy: Path = _POLICY) -> None:
    """List the app bundles this site's policy approves."""
    from fedmed.policy import load_policy

    apps = load_policy(policy).approved_apps
    console = Console()
    if not apps:
        console.print(f"no app bundle is approved in {policy}: every run will be refused")
        return
    table = Table("fab hash (SHA-256)", "approved by", "approved at (UTC)", "note")
    for entry in apps:
        table.add_row(entry.fab_hash, entry.approved_by, entry.approved_at, entry.note)
    console.print(table)


@app.command("executor")
def executor(
    policy: Path = _POLICY,
    runtime_api_address: str = typer.Option(
        "127.0.0.1:9094", "--runtime-api-address",
        help="The SuperNode's Runtime API (flower-supernode --host/--port).",
    ),
    root_certificates: Path = typer.Option(
        None, "--root-certificates", help="CA of the Runtime API's TLS certificate."
    ),
    insecure: bool = typer.Option(
        False, "--insecure",
        help="Plain HTTP to the Runtime API (loopback or a network shared only with it).",
    ),
    superexec_auth_secret_file: Path = typer.Option(
        None, "--superexec-auth-secret-file",
        help="The secret the SuperNode was started with (only its holder acquires tasks).",
    ),
) -> None:
    """Run the hospital's ClientApp executor: approved bundles only, checked before unpacking.

    Start the SuperNode with `--isolation process`; run this as another user or container,
    without access to the SuperNode's private key.
    """
    from fedmed.security.executor import load_executor_settings, serve

    settings = load_executor_settings(
        policy=policy, runtime_api_address=runtime_api_address,
        root_certificates=root_certificates, insecure=insecure,
        superexec_auth_secret_file=superexec_auth_secret_file,
    )
    _log_to_stderr()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(settings, stop)


@app.command("clientapp", hidden=True)
def clientapp(
    policy: Path = _POLICY,
    runtime_api_address: str = typer.Option(..., "--runtime-api-address"),
    root_certificates: Path = typer.Option(None, "--root-certificates"),
    insecure: bool = typer.Option(False, "--insecure"),
    parent_pid: int = typer.Option(None, "--parent-pid", min=1),
) -> None:
    """One task of the executor (started by it; reads the task token from stdin)."""
    from fedmed.security.executor import load_executor_settings, run_task

    settings = load_executor_settings(
        policy=policy, runtime_api_address=runtime_api_address,
        root_certificates=root_certificates, insecure=insecure,
    )
    _log_to_stderr()
    run_task(settings, sys.stdin.readline().strip(), parent_pid)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("fedmed.executor")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
