"""The coordinator's public door: an nginx config that exposes only Flower's Fleet API.

Flower 1.42's ``flower-superlink`` serves three HTTP APIs from one listener
(``--host``/``--port``, FastAPI under uvicorn): the Fleet API (``/v1/fleet/...``, what
SuperNodes call), the Control API (``/v1/control/...``: start and stop runs, list runs,
register and unregister SuperNodes; the open-source build has no account authentication
for it) and the Runtime API (``/v1/runtime/...``, where the ServerApp executor fetches its
tasks). Flower has no flag to serve them on separate addresses any more (the old gRPC
``--fleet-api-address``/``--control-api-address`` are deprecated no-ops), so the split is
made in front of it: the SuperLink binds to an internal address, and a reverse proxy on the
public address forwards exactly the Fleet API's routes and answers everything else with
403 itself. Every Fleet call is HTTP/1.1 ``POST`` with a protobuf body; SuperNode
authentication travels in request headers (``flwr-public-key``, ``flwr-signature``,
``flwr-timestamp``: an ECDSA signature over a fresh timestamp) that nginx forwards
unchanged, so node authentication works through the proxy.

The proxy terminates the public TLS with the certificate from ``fedmed certs init`` and
opens a second TLS connection to the SuperLink, verifying it against the federation CA
(``--enable-supernode-auth`` requires the SuperLink itself to run with TLS).

Hand-written because nginx has no Python API; :func:`nginx_config` is a pure function of
:class:`ProxySettings`, and the routes come from :data:`FLEET_PATHS` (checked against the
installed Flower's Fleet router by the test suite).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmed.errors import SecurityError

__all__ = [
    "FLEET_PATHS",
    "ProxySettings",
    "load_proxy_settings",
    "nginx_command",
    "nginx_config",
    "write_nginx_config",
]

FLEET_PATHS: tuple[str, ...] = (
    "/v1/fleet/register-node",
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)
"""Every route of Flower 1.42's Fleet API (``flwr.superlink.routers.fleet.router``).

``/v1/fleet/unregister-node`` is the SuperNode deleting *itself* (signed with its own key);
registering and unregistering other nodes is the Control API's, which is not forwarded.
"""

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9.-]+$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")


class ProxySettings(BaseModel):
    """Where the proxy listens, what it presents, and where the SuperLink is.

    Attributes:
        listen: Public ``HOST:PORT`` the SuperNodes connect to (``--superlink`` at a site).
        server_name: The name hospitals use for the coordinator; it must be on the
            certificate (``fedmed certs init --server-name``).
        server_cert: The coordinator's TLS certificate (``server.pem``).
        server_key: Its private key (``server.key``).
        upstream: The SuperLink's internal ``HOST:PORT`` (``--host``/``--port``).
        upstream_ca: The federation CA (``ca.crt``), to verify the SuperLink.
        upstream_name: A DNS name on the SuperLink's certificate (nginx checks the name,
            not IP addresses): ``localhost`` on one host, ``superlink`` in compose.
        state_dir: Folder for the pid file, logs and nginx's temporary files (writable);
            absolute, because nginx resolves relative paths against its own prefix.
        max_body: Largest request body (nginx size: ``64m``); Flower sends model weights
            in chunks of at most 5 MiB per ``push-object`` call.
        timeout_s: Read/send timeout towards the SuperLink, seconds.
        logs: ``files`` (``error.log``/``access.log`` in ``state_dir``) or ``stdio``
            (stderr/stdout, for a container's log driver).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = "0.0.0.0:443"
    server_name: str
    server_cert: Path
    server_key: Path
    upstream: str = "127.0.0.1:8000"
    upstream_ca: Path
    upstream_name: str = "localhost"
    state_dir: Path = Path("/tmp/fedmed-proxy")
    max_body: str = "64m"
    timeout_s: int = Field(default=300, ge=1, le=86400)
    logs: Literal["files", "stdio"] = "files"

    @field_validator("listen", "upstream")
    @classmethod
    def _address(cls, value: str) -> str:
        match = _ADDRESS.match(value)
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:443), got {value!r}")
        return value

    @field_validator("server_name", "upstream_name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"expected a DNS name or IP address, got {value!r}")
        return value

    @field_validator("max_body")
    @classmethod
    def _size(cls, value: str) -> str:
        if not _SIZE.match(value):
            raise ValueError(f"expected an nginx size such as 64m, got {value!r}")
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"expected an absolute folder, got {str(value)!r}")
        return value


def _quoted(path: Path) -> str:
    text = str(path)
    if any(c in text for c in "\"';{}\n\\$"):
        raise SecurityError(
            f"proxy path {text!r}: expected no quotes, ';', braces, '$' or backslashes "
            "(nginx would read them as syntax); move the file"
        )
    return f'"{text}"'


def nginx_config(settings: ProxySettings) -> str:
    """The complete ``nginx.conf`` of the coordinator's public address.

    Args:
        settings: Validated proxy settings.

    Returns:
        The configuration text (run it with :func:`nginx_command`).

    Raises:
        SecurityError: A path contains characters nginx would parse as syntax.
    """
    state = settings.state_dir
    stdio = settings.logs == "stdio"
    error_log = "stderr" if stdio else _quoted(state / "error.log")
    access_log = "/dev/stdout" if stdio else _quoted(state / "access.log")
    routes = "|".join(p.removeprefix("/v1/fleet/") for p in FLEET_PATHS)  # [a-z-] only
    temp = "\n".join(
        f"    {kind}_temp_path {_quoted(state / kind)};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
# fedmed coordinator proxy (generated by `fedmed proxy config`; Flower 1.42).
# Public: only the Fleet API ({len(FLEET_PATHS)} routes, POST). The Control API (runs,
# node registration) and the Runtime API stay on the SuperLink's internal address.
worker_processes 1;
pid {_quoted(state / "nginx.pid")};
error_log {error_log} warn;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
    access_log {access_log};
{temp}

    upstream fedmed_superlink {{
        server {settings.upstream};
        keepalive 16;
    }}

    server {{
        listen {settings.listen} ssl;
        server_name {settings.server_name};
        ssl_certificate {_quoted(settings.server_cert)};
        ssl_certificate_key {_quoted(settings.server_key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {settings.max_body};

        location ~ ^/v1/fleet/({routes})$ {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://fedmed_superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # Re-encrypted to the SuperLink, verified against the federation CA.
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {_quoted(settings.upstream_ca)};
            proxy_ssl_name {settings.upstream_name};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            # RPC bodies go straight through (no temporary files).
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {settings.timeout_s}s;
            proxy_send_timeout {settings.timeout_s}s;
        }}

        location / {{
            default_type text/plain;
            return 403 "only the Flower Fleet API is served here\\n";
        }}
    }}
}}
"""


def write_nginx_config(
    settings: ProxySettings, path: Path | str, *, check_files: bool = True
) -> Path:
    """Write :func:`nginx_config` to ``path``.

    Args:
        settings: Validated proxy settings.
        path: The file to write.
        check_files: Check here that the certificate files exist and create
            ``settings.state_dir``; off when the paths are those inside a container.

    Raises:
        SecurityError: A certificate file is missing, or a path is unusable.
    """
    text = nginx_config(settings)
    if check_files:
        for flag, file in (
            ("server.pem", settings.server_cert),
            ("server.key", settings.server_key),
            ("ca.crt", settings.upstream_ca),
        ):
            if not file.is_file():
                raise SecurityError(
                    f"{flag} {file}: expected an existing file, none found; create it with "
                    "`fedmed certs init` or fix the path"
                )
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def nginx_command(config: Path | str, *, executable: str = "nginx") -> list[str]:
    """``nginx`` in the foreground with only this config (no system-wide files).

    ``-e`` sends the messages nginx writes before reading the config to the same place as
    the config's own error log would, so an unprivileged user can start it.
    """
    conf = Path(config).resolve()
    return [executable, "-p", str(conf.parent), "-c", str(conf), "-e", "stderr",
            "-g", "daemon off;"]


def load_proxy_settings(**values: object) -> ProxySettings:
    """Validate proxy settings given as keyword arguments (e.g. from the CLI).

    Raises:
        SecurityError: A value is invalid; the message names it.
    """
    try:
        return ProxySettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SecurityError(f"proxy {where}: {first['msg']}") from None
