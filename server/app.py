"""Flower ServerApp of fedmed: ``flwr run .`` loads ``server.app:app``.

Thin adapter; the work is in :mod:`fedmed.federation.server_app`. Run config keys
(``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``--run-config``):
``fedmed-config`` (federation YAML), ``run-dir`` (run directory), ``resume`` (continue
after the last finished round), ``strategy`` and ``rounds`` (overrides; empty/0: the
config's).
"""

from fedmed.federation.server_app import make_server_app

app = make_server_app()
