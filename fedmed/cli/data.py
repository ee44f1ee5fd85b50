"""``fedmed data synth|check|preprocess``: one module per command, registered here."""

from __future__ import annotations

import typer

from fedmed.cli import check_cmd, preprocess_cmd, synth_cmd

app = typer.Typer(no_args_is_help=True)
synth_cmd.register(app)
check_cmd.register(app)
preprocess_cmd.register(app)
