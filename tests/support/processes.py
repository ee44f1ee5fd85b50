"""Supervised processes for the deployment tests and benchmarks.

:class:`ManagedProcess` starts a command (see :mod:`tests.support.flower_commands`) in its
own process group and always stops the whole group: Flower's SuperLink and SuperNode start
SuperExec and app subprocesses, and a test must leave nothing running, also on failure.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from fedmed.errors import FederationError

__all__ = [
    "SUPERNODE_ACTIVATED",
    "ManagedProcess",
    "flower_env",
    "free_port",
    "start_supernode_until_active",
    "wait_for_port",
]


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
"""What ``flower-supernode`` 1.42 logs once the SuperLink has activated it."""


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
    Flower 1.42 hard-codes that: the SuperNode declares a 30 s heartbeat interval (there
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
