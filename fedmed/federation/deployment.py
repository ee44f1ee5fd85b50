"""Flower 1.41 deployment topology: exact command lines and supervised processes.

In Flower 1.41 the SuperLink serves its Fleet, Control and Runtime APIs over one HTTP(S)
port (``--host``/``--port``, default 127.0.0.1:8000); the old gRPC ports 9091/9092/9093
are gone. TLS uses ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` and SuperNode
authentication is ``--enable-supernode-auth`` plus ``flwr supernode register`` of each
site's public key. A SuperNode connects with ``--superlink HOST:PORT
--root-certificates CA --auth-supernode-private-key KEY`` and serves its own Runtime API
for the ClientApp on ``--host``/``--port`` (default 127.0.0.1:9094).

The builders here are pure functions returning argv lists, used by ``docs/deploy.md``, the
compose files and the integration tests; :class:`ManagedProcess` starts one of them in its
own process group and always stops the whole group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from fedmed.errors import FederationError, SecurityError

__all__ = [
    "DEFAULT_SUPERLINK_PORT",
    "DEFAULT_SUPERNODE_PORT",
    "ManagedProcess",
    "flower_env",
    "flwr_run_command",
    "flwr_config_toml",
    "free_port",
    "node_config_string",
    "start_supernode_until_active",
    "superlink_command",
    "supernode_command",
    "wait_for_port",
    "write_flwr_config",
]

DEFAULT_SUPERLINK_PORT = 8000
"""Flower 1.41's SuperLink HTTP(S) port (Fleet + Control + Runtime APIs)."""
DEFAULT_SUPERNODE_PORT = 9094
"""Flower 1.41's SuperNode Runtime API port (where the ClientApp executor connects)."""

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
    return argv


def node_config_string(
    data_dir: Path | str,
    state_dir: Path | str,
    *,
    site_name: str | None = None,
    cache_dir: Path | str | None = None,
    device: str | None = None,
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
    isolation: str = "subprocess",
    trusted_entities: Path | str | None = None,
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
        host: Bind address of the SuperNode's Runtime API; keep loopback in subprocess
            isolation so that nothing outside the host can reach it.
        port: Runtime API port (one per SuperNode on a machine).
        isolation: ``subprocess`` (SuperNode runs the ClientApp executor itself) or
            ``process``.
        trusted_entities: YAML of trusted app reviewers' Ed25519 keys; the SuperNode
            then runs only app bundles signed by one of them (Flower Hub apps).
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
    if trusted_entities is not None:
        argv += ["--trusted-entities", _existing(trusted_entities, "--trusted-entities")]
    argv += [
        "--node-config",
        node_config_string(
            data_dir, state_dir, site_name=site_name, cache_dir=cache_dir, device=device
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


def flwr_config_toml(
    connections: Mapping[str, tuple[str, Path | str | None]],
    default: str | None = None,
    *,
    simulation: Mapping[str, int] | None = None,
) -> str:
    """Text of a Flower 1.41 CLI config (``$FLWR_HOME/config.toml``).

    ``flwr run . NAME`` and ``flwr supernode register KEY NAME`` look up
    ``[superlink.NAME]`` there: ``address`` is the SuperLink's HOST:PORT and
    ``root-certificates`` the CA file (absolute path). A ``None`` CA writes
    ``insecure = true``.

    Args:
        connections: ``{name: (address, ca_cert_or_None)}``.
        default: Connection used when a command names none (first one if ``None``).
        simulation: ``{name: num_supernodes}`` for connections to a ``--simulation``
            SuperLink: writes ``options.num-supernodes`` (Flower 1.41's simulation
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


def flower_env(
    flwr_home: Path | str | None = None,
    bin_dir: Path | str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for Flower processes started from Python.

    Args:
        flwr_home: Flower's home (config, installed apps); Flower's own ``FLWR_HOME``.
        bin_dir: Directory prepended to ``PATH`` so that Flower finds ``flower-superexec``
            (it starts it by name); defaults to this interpreter's ``bin``.
        base: Starting environment (``os.environ`` when ``None``).

    Returns:
        A new environment dict. Flower's update check (a network call) is disabled.
    """
    env = dict(os.environ if base is None else base)
    bin_path = str(bin_dir) if bin_dir is not None else str(Path(sys.executable).parent)
    env["PATH"] = bin_path + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _check_port(port: int, name: str) -> None:
    if not 1 <= int(port) <= 65535:
        raise FederationError(f"{name}: expected a TCP port 1..65535, got {port}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds; ``False`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


class ManagedProcess:
    """A child process in its own process group, always stopped on exit.

    Flower's SuperLink and SuperNode start SuperExec and app subprocesses; stopping the
    whole group (SIGTERM, then SIGKILL after ``stop_timeout``) leaves nothing behind.

    Example:
        >>> with ManagedProcess(argv, log_path=tmp / "sl.log", port=("127.0.0.1", p)) as sl:
        ...     sl.wait_for_log("Uvicorn running")
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path | str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        port: tuple[str, int] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """Describe the process; nothing starts before ``__enter__``/:meth:`start`.

        Args:
            argv: Command line.
            log_path: File receiving stdout and stderr.
            env: Environment (:func:`flower_env` output); inherited when ``None``.
            cwd: Working directory.
            port: ``(host, port)`` to wait for before ``start`` returns.
            start_timeout: Seconds to wait for ``port``.
            stop_timeout: Seconds between SIGTERM and SIGKILL.
        """
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = None if env is None else dict(env)
        self.cwd = None if cwd is None else str(cwd)
        self.port = port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, append: bool = False) -> ManagedProcess:
        """Start the process (and wait for its port when one was given).

        Args:
            append: Keep the log of earlier starts (a restarted process) instead of
                truncating it.

        Raises:
            FederationError: It exited early or its port did not open in time; the log
                tail is in the message. The process group is stopped first.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab" if append else "wb") as log:
            # start_new_session: own process group, so stop() reaches the grandchildren.
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        if self.port is not None:
            host, port = self.port
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if wait_for_port(host, port, timeout=0.5):
                    return self
            self.stop()
            raise FederationError(
                f"{self.argv[0]} did not open {host}:{port} within {self.start_timeout:.0f} s "
                f"(exit code {self.returncode}); log {self.log_path}:\n{self.log_tail()}"
            )
        return self

    @property
    def returncode(self) -> int | None:
        """Exit code, or ``None`` while running / before start."""
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to exit; its exit code or ``None``."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str] | None:
        """Poll the log until the regex ``pattern`` matches; ``None`` on timeout or exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.returncode is not None:
                return regex.search(self.log_text())
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``stop_timeout``."""
        proc = self.process
        if proc is None:
            return
        pgid = proc.pid  # start_new_session made the child its group leader
        for sig, grace in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its group may still hold children that ignored SIGTERM.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break

    def __enter__(self) -> ManagedProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


SUPERNODE_ACTIVATED = r"SuperNode ID: (\d+)"
"""What ``flower-supernode`` 1.41 logs once the SuperLink has activated it."""


def start_supernode_until_active(
    proc: ManagedProcess,
    *,
    timeout: float = 120.0,
    retry_delay: float = 5.0,
    cancel: threading.Event | None = None,
) -> int:
    """Start a SuperNode and start it again while the SuperLink refuses to activate it.

    A SuperNode that was killed (power loss, OOM, SIGKILL) cannot send its deactivation, so
    the SuperLink keeps its node ID online until the old session misses its heartbeats.
    Flower 1.41 hard-codes that: the SuperNode declares a 30 s heartbeat interval (there
    is no flag to change it) and the SuperLink waits ``HEARTBEAT_PATIENCE`` = 2 intervals,
    so a restart within about a minute of the crash is refused with "could not be
    activated" (HTTP 412). ``flower-supernode`` treats that as fatal and exits with code
    305 instead of retrying (``--max-retries``/``--max-wait-time`` only cover transport
    errors), so a supervisor must restart it: compose's ``restart: unless-stopped`` in
    production, this loop in tests and scripts. Each attempt's log is appended to
    ``proc.log_path``.

    Args:
        proc: The SuperNode (not started, or exited).
        timeout: Give up after this many seconds.
        retry_delay: Seconds between an exit and the next start; each start costs a
            Python process start-up, so do not hammer the SuperLink.
        cancel: Set it to stop trying (e.g. from the ``finally`` of a test).

    Returns:
        The number of starts it took (1: activated at once).

    Raises:
        FederationError: Not activated within ``timeout``, or cancelled; the log tail is in
            the message. The process group is stopped first.
    """
    deadline = time.monotonic() + timeout
    pattern = re.compile(SUPERNODE_ACTIVATED)
    stop = cancel if cancel is not None else threading.Event()  # its wait() is the sleep
    attempts = 0
    while time.monotonic() < deadline and not stop.is_set():
        # The previous attempt's SuperExec child outlives its parent: stop the whole group.
        proc.stop()
        offset = len(proc.log_text()) if attempts else 0
        proc.start(append=attempts > 0)
        attempts += 1
        while time.monotonic() < deadline and proc.returncode is None:
            if pattern.search(proc.log_text()[offset:]):
                return attempts
            if stop.wait(0.2):
                break
        if proc.returncode is None and pattern.search(proc.log_text()[offset:]):
            return attempts
        stop.wait(retry_delay)
    proc.stop()
    raise FederationError(
        f"{proc.argv[0]} was not activated by the SuperLink after {attempts} start(s) in "
        f"{timeout:.0f} s (cancelled: {stop.is_set()}); check "
        f"that its key is registered (`flwr supernode list`); log {proc.log_path}:\n"
        f"{proc.log_tail()}"
    )
