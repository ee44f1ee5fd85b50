"""The ``fedmed`` command: a thin typer front over the library.

Commands live in one module per job family and are registered here. Heavy imports (torch,
MONAI, Flower) happen inside the commands so that ``fedmed --help`` is instant.
Exit codes: 0 success, 1 invalid input (a :class:`~fedmed.errors.FedMedError`, printed
without a traceback), 2 usage errors (typer/click).
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from fedmed.cli import (
    certs,
    compare_cmd,
    data,
    export_cmd,
    federation,
    predict_cmd,
    privacy,
    proxy_cmd,
    site_cmd,
    train,
)
from fedmed.errors import FedMedError

app = typer.Typer(
    name="fedmed",
    help="Federated 3D medical image segmentation across hospitals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data", help="Generate, check and preprocess site datasets.")
app.add_typer(certs.app, name="certs", help="Certificates and site keys for deployment.")
app.add_typer(privacy.app, name="privacy", help="Differential-privacy ledger.")
app.add_typer(export_cmd.app, name="export", help="Export a run's model (MONAI Bundle).")
app.add_typer(site_cmd.app, name="site", help="What this hospital approves; its executor.")
app.add_typer(proxy_cmd.app, name="proxy", help="The coordinator's public reverse proxy.")
train.register(app)
predict_cmd.register(app)
federation.register(app)
compare_cmd.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    err = Console(stderr=True)
    try:
        # With standalone_mode=False click returns typer.Exit's code instead of raising it.
        rv = app(args=argv, standalone_mode=False)
    except FedMedError as exc:
        # escape: a message's "[...]" (a path, a list) is text, not rich markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        err.print("aborted")
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
