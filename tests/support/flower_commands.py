"""Flower 1.42 deployment command lines, as the tests, benchmarks and docs use them.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime APIs over one HTTP(S) port
(``--host``/``--port``, default 127.0.0.1:8000); TLS uses
``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and SuperNode authentication is
``--enable-supernode-auth`` plus ``flwr supernode register`` of each site's public key. In
fedmed's deployment the SuperLink binds to an internal address and nginx forwards only the
Fleet API (:mod:`fedmed.security.proxy`). A SuperNode connects with ``--superlink
HOST:PORT --root-certificates CA --auth-supernode-private-key KEY`` and serves its own
Runtime API on ``--host``/``--port`` (default 127.0.0.1:9094); with ``--isolation process``
the hospital's executor (``fedmed site executor``) takes the ClientApp tasks from there.

Pure functions returning argv lists; :mod:`tests.support.processes` starts them.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

from fedmed.errors import FederationError, SecurityError

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "executor_command",
    "flwr_config_toml",
    "flwr_run_command",
    "node_config_string",
    "superlink_command",
    "supernode_command",
    "write_flwr_config",
]

DEFAULT_SUPERLINK_PORT = 8000
"""Flower 1.42's SuperLink HTTP(S) port (Fleet + Control + Runtime APIs)."""
DEFAULT_SUPERNODE_PORT = 9094
"""Flower 1.42's SuperNode Runtime API port (where the ClientApp executor connects)."""

_INSECURE_WARNING = (
    "--insecure: TLS is OFF. Model updates and node credentials travel in clear text and "
    "SuperNode authentication cannot be used. Use this only on a closed test network."
)


def _warn_insecure() -> None:
    warnings.warn(_INSECURE_WARNING, UserWarning, stacklevel=3)
    print(f"WARNING: {_INSECURE_WARNING}", file=sys.stderr)


def _existing(path: Path | str | None, flag: str) -> str:
    if path is None:
        raise SecurityError(
            f"{flag}: a file is required for a TLS deployment; create it with "
            "`fedmed certs init` (or pass insecure=True / --insecure for a closed test network)"
        )
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise SecurityError(
            f"{flag} {resolved}: expected an existing file, none found; "
            "create it with `fedmed certs init`/`fedmed certs site` or fix the path"
        )
    return str(resolved)


def superlink_command(
    *,
    ca_cert: Path | str | None = None,
    server_cert: Path | str | None = None,
    server_key: Path | str | None = None,
    host: str = "0.0.0.0",
    port: int = DEFAULT_SUPERLINK_PORT,
    node_auth: bool = True,
    isolation: str = "subprocess",
    database: Path | str | None = None,
    runtime_dependency_installation: bool = False,
    insecure: bool = False,
    simulation: bool = False,
    superexec_auth_secret_file: Path | str | None = None,
    executable: str = "flower-superlink",
) -> list[str]:
    """Build the coordinator's ``flower-superlink`` command.

    Args:
        ca_cert: CA certificate (``--ssl-ca-certfile``); also used by the SuperLink's own
            SuperExec to verify the Runtime API in subprocess isolation.
        server_cert: SuperLink certificate (``--ssl-certfile``).
        server_key: SuperLink private key (``--ssl-keyfile``).
        host: Bind address of the HTTP(S) APIs (``0.0.0.0`` to accept remote SuperNodes).
        port: Port of the Fleet/Control/Runtime APIs.
        node_auth: Add ``--enable-supernode-auth`` (only registered SuperNodes may join).
        isolation: ``subprocess`` (SuperLink starts the ServerApp executor itself) or
            ``process`` (a separate ``flower-superexec`` connects to the Runtime API).
        database: SQLite file for persistent state; in-memory when ``None``.
        runtime_dependency_installation: Let Flower ``uv sync`` app dependencies at run
            time. Off by default: nothing downloads at run time, the image has them.
        insecure: Plain HTTP, no certificates. Prints a warning; incompatible with
            ``node_auth``.
        simulation: ``--simulation``: the SuperLink runs ``flwr run`` apps in Flower's
            simulation engine (virtual SuperNodes; ``options.num-supernodes`` of the
            connection in ``config.toml``) instead of on real SuperNodes. This replaces
            Flower's ``:local:`` connection, whose self-started SuperLink would ``uv sync``
            the app's dependencies (network) at run time.
        superexec_auth_secret_file: ``--superexec-auth-secret-file`` (process isolation):
            only an executor holding the same secret can acquire ServerApp tasks.
        executable: Program name or path.

    Returns:
        The argv list.

    Raises:
        SecurityError: Missing certificate files, or ``insecure`` with ``node_auth``.
        FederationError: Bad ``isolation`` or ``port``.
    """
    _check_port(port, "port")
    if isolation not in ("subprocess", "process"):
        raise FederationError(
            f"isolation: expected 'subprocess' or 'process', got {isolation!r}"
        )
    argv = [executable]
    if insecure:
        if node_auth:
            raise SecurityError(
                "--insecure cannot be combined with SuperNode authentication (Flower "
                "requires TLS for it); drop --insecure and pass the certificates"
            )
        _warn_insecure()
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            _existing(ca_cert, "--ssl-ca-certfile"),
            "--ssl-certfile",
            _existing(server_cert, "--ssl-certfile"),
            "--ssl-keyfile",
            _existing(server_key, "--ssl-keyfile"),
        ]
        if node_auth:
            argv.append("--enable-supernode-auth")
    argv += ["--host", host, "--port", str(port), "--isolation", isolation]
    if database is not None:
        argv += ["--database", str(database)]
    if not runtime_dependency_installation:
        argv.append("--disable-runtime-dependency-installation")
    if simulation:
        argv.append("--simulation")
    if superexec_auth_secret_file is not None:
        flag = "--superexec-auth-secret-file"
        argv += [flag, _existing(superexec_auth_secret_file, flag)]
    return argv


def node_config_string(
    data_dir: Path | str,
    state_dir: Path | str,
    *,
    site_name: str | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    policy: Path | str | None = None,
) -> str:
    """The ``--node-config`` value the fedmed ClientApp reads at a hospital.

    Values are TOML literal strings (single quotes), the form Flower's
    ``parse_config_args`` accepts, e.g. ``data-dir='/data' state-dir='/state'``.

    Args:
        data_dir: The site's dataset folder (read-only is enough).
        state_dir: Writable folder for the site's state (privacy ledger, logs).
        site_name: Optional name used in logs and metrics.
        cache_dir: Optional preprocessing cache folder.
        device: Optional torch device (``cuda``, ``cuda:0``, ``cpu``).
        policy: The site policy (YAML) the ClientApp enforces.

    Returns:
        The space-separated ``key='value'`` string.

    Raises:
        FederationError: A value contains a single quote or is empty.
    """
    pairs: list[tuple[str, str | None]] = [
        ("data-dir", str(data_dir)),
        ("state-dir", str(state_dir)),
        ("site-name", site_name),
        ("cache-dir", None if cache_dir is None else str(cache_dir)),
        ("device", device),
        ("policy", None if policy is None else str(policy)),
    ]
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        if not value or "'" in value or "\n" in value:
            raise FederationError(
                f"node config {key}: expected a non-empty value without quotes or newlines, "
                f"got {value!r}; rename the path or pass another one"
            )
        parts.append(f"{key}='{value}'")
    return " ".join(parts)


def supernode_command(
    *,
    superlink: str,
    data_dir: Path | str,
    state_dir: Path | str,
    root_cert: Path | str | None = None,
    auth_key: Path | str | None = None,
    site_name: str | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_SUPERNODE_PORT,
    isolation: str = "process",
    policy: Path | str | None = None,
    superexec_auth_secret_file: Path | str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    insecure: bool = False,
    executable: str = "flower-supernode",
) -> list[str]:
    """Build a hospital's ``flower-supernode`` command.

    Args:
        superlink: ``HOST:PORT`` of the SuperLink (no URL scheme).
        data_dir: Site dataset folder, passed through ``--node-config``.
        state_dir: Writable site state folder, passed through ``--node-config``.
        root_cert: The federation CA certificate (``--root-certificates``).
        auth_key: The site's OpenSSH ECDSA private key (``--auth-supernode-private-key``).
        site_name: Optional ``site-name`` node config.
        cache_dir: Optional ``cache-dir`` node config.
        device: Optional ``device`` node config.
        host: Bind address of the SuperNode's Runtime API; keep it on loopback (or a
            network shared only with the executor).
        port: Runtime API port (one per SuperNode on a machine).
        isolation: ``process`` (the hospital's executor, ``fedmed site executor``, runs
            the ClientApp: approved bundles only) or ``subprocess`` (Flower's own
            executor, which runs any bundle; only for nodes that run no app).
        policy: The site policy, passed as the ``policy`` node config.
        superexec_auth_secret_file: Only an executor holding this secret may acquire
            tasks (``--superexec-auth-secret-file``; process isolation).
        max_retries: Give up connecting after this many retries (``None``: forever).
        max_wait_time: Give up connecting after this many seconds (``None``: forever).
        insecure: Plain HTTP, no root certificate; prints a warning.
        executable: Program name or path.

    Returns:
        The argv list.

    Raises:
        SecurityError: Missing key/certificate, or ``insecure`` with a root certificate.
        FederationError: Bad address, port, isolation or node config value.
    """
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}", superlink):
        raise FederationError(
            f"--superlink {superlink!r}: expected HOST:PORT without a scheme, "
            "e.g. coordinator.example.org:8000"
        )
    _check_port(port, "port")
    if isolation not in ("subprocess", "process"):
        raise FederationError(
            f"isolation: expected 'subprocess' or 'process', got {isolation!r}"
        )
    argv = [executable, "--superlink", superlink]
    if insecure:
        if root_cert is not None:
            raise SecurityError(
                "--insecure disables TLS but a root certificate was given; drop --insecure"
            )
        _warn_insecure()
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", _existing(root_cert, "--root-certificates")]
    if auth_key is not None:
        flag = "--auth-supernode-private-key"
        argv += [flag, _existing(auth_key, flag)]
    elif not insecure:
        raise SecurityError(
            "--auth-supernode-private-key: the site's private key is required (the "
            "coordinator only admits registered SuperNodes); create it with "
            "`fedmed certs site --name SITE --out DIR`"
        )
    if superexec_auth_secret_file is not None:
        flag = "--superexec-auth-secret-file"
        argv += [flag, _existing(superexec_auth_secret_file, flag)]
    argv += [
        "--node-config",
        node_config_string(
            data_dir, state_dir, site_name=site_name, cache_dir=cache_dir, device=device,
            policy=policy,
        ),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        isolation,
    ]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    return argv


def executor_command(
    *,
    policy: Path | str,
    runtime_api_address: str,
    superexec_auth_secret_file: Path | str | None = None,
    root_certificates: Path | str | None = None,
    executable: str = "fedmed",
) -> list[str]:
    """The hospital's executor: ``fedmed site executor`` (see :mod:`fedmed.security.executor`).

    Args:
        policy: The site policy whose approved bundles may run.
        runtime_api_address: The SuperNode's Runtime API ``HOST:PORT``.
        superexec_auth_secret_file: The SuperNode's SuperExec secret.
        root_certificates: CA of the Runtime API's certificate; plain HTTP (loopback)
            when ``None``.
        executable: ``fedmed`` program name or path.

    Returns:
        The argv list. It names no SuperNode key: the executor never needs it.
    """
    argv = [executable, "site", "executor", "--policy", _existing(policy, "--policy"),
            "--runtime-api-address", runtime_api_address]
    if root_certificates is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", _existing(root_certificates, "--root-certificates")]
    if superexec_auth_secret_file is not None:
        flag = "--superexec-auth-secret-file"
        argv += [flag, _existing(superexec_auth_secret_file, flag)]
    return argv


def flwr_config_toml(
    connections: Mapping[str, tuple[str, Path | str | None]],
    default: str | None = None,
    *,
    simulation: Mapping[str, int] | None = None,
) -> str:
    """Text of a Flower 1.42 CLI config (``$FLWR_HOME/config.toml``).

    ``flwr run . NAME`` and ``flwr supernode register KEY NAME`` look up
    ``[superlink.NAME]`` there: ``address`` is the SuperLink's HOST:PORT and
    ``root-certificates`` the CA file (absolute path). A ``None`` CA writes
    ``insecure = true``.

    Args:
        connections: ``{name: (address, ca_cert_or_None)}``.
        default: Connection used when a command names none (first one if ``None``).
        simulation: ``{name: num_supernodes}`` for connections to a ``--simulation``
            SuperLink: writes ``options.num-supernodes`` (Flower 1.42's simulation
            federation; it replaces ``[tool.flwr.federations.*]`` of ``pyproject.toml``).

    Returns:
        TOML text.
    """
    if not connections:
        raise FederationError("flwr config: expected at least one SuperLink connection")
    names = list(connections)
    chosen = default or names[0]
    if chosen not in connections:
        raise FederationError(f"flwr config default {chosen!r}: not one of {names}")
    lines = ["[superlink]", f'default = "{chosen}"', ""]
    for name, (address, ca_cert) in connections.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise FederationError(
                f"flwr connection name {name!r}: expected letters, digits, '_' or '-'"
            )
        lines.append(f"[superlink.{name}]")
        lines.append(f'address = "{address}"')
        if ca_cert is None:
            lines.append("insecure = true")
        else:
            ca_path = Path(ca_cert).expanduser().resolve().as_posix()
            lines.append(f'root-certificates = "{ca_path}"')
        if simulation and name in simulation:
            n = int(simulation[name])
            if n < 1:
                raise FederationError(
                    f"flwr connection {name!r}: num-supernodes must be >= 1, got {n}"
                )
            lines.append(f"options.num-supernodes = {n}")
        lines.append("")
    return "\n".join(lines)


def write_flwr_config(
    flwr_home: Path | str,
    connections: Mapping[str, tuple[str, Path | str | None]],
    default: str | None = None,
    *,
    simulation: Mapping[str, int] | None = None,
) -> Path:
    """Write ``FLWR_HOME/config.toml`` (see :func:`flwr_config_toml`); returns its path."""
    home = Path(flwr_home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(
        flwr_config_toml(connections, default, simulation=simulation), encoding="utf-8"
    )
    return path


def flwr_run_command(
    app_dir: Path | str,
    connection: str,
    run_config: Mapping[str, str | int | float | bool] | None = None,
    *,
    stream: bool = True,
    executable: str = "flwr",
) -> list[str]:
    """Build ``flwr run APP CONNECTION [--run-config ...] [--stream]``.

    Values are written as TOML (strings single-quoted), the form ``flwr`` parses, e.g.
    ``--run-config "fedmed-config='/abs/fed.yaml' rounds=2"``; paths should be absolute
    because the app runs from an unpacked copy of the project (its FAB), not from
    ``app_dir``.

    Raises:
        FederationError: a string value contains a single quote or a newline.
    """
    argv = [executable, "run", str(app_dir), connection]
    if run_config:
        parts = []
        for key, value in run_config.items():
            if isinstance(value, bool):
                parts.append(f"{key}={'true' if value else 'false'}")
            elif isinstance(value, int | float):
                parts.append(f"{key}={value}")
            else:
                if "'" in value or "\n" in value:
                    raise FederationError(
                        f"run config {key}: expected a value without quotes or newlines, "
                        f"got {value!r}"
                    )
                parts.append(f"{key}='{value}'")
        argv += ["--run-config", " ".join(parts)]
    if stream:
        argv.append("--stream")
    return argv


def _check_port(port: int, name: str) -> None:
    if not 1 <= int(port) <= 65535:
        raise FederationError(f"{name}: expected a TCP port 1..65535, got {port}")


