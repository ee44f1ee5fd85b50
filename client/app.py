"""Flower ClientApp of fedmed: ``flwr run .`` loads ``client.app:app``.

Thin adapter; the work is in :mod:`fedmed.federation.client_app`. In deployment the SuperNode's
node config names the site's data: ``--node-config "data-dir='/data/site'"`` (optional
``site-name``, ``device``, ``cache-dir``, ``state-dir``); in simulation ``partition-id``
picks the site from the federation config.
"""

from fedmed.federation.client_app import make_client_app

app = make_client_app()
