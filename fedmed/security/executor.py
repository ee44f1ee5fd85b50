"""The hospital's executor: runs the ClientApp of approved app bundles only.

With ``flower-supernode --isolation process`` the SuperNode starts no code of its own: it
queues one *task* per message and serves them on its Runtime API (``--host``/``--port``,
``/v1/runtime/...``). An executor polls ``acquire-task`` (HMAC-signed when the SuperNode
has ``--superexec-auth-secret-file``), receives a one-time token, and starts a task process
that pulls the message, the run's context and the app bundle (FAB) with that token,
unpacks the bundle into ``$FLWR_HOME/apps``, puts it first on ``sys.path`` and imports the
ClientApp (Flower 1.42: ``flower-superexec`` and ``flwr-clientapp``).

Flower offers no hook to vet a bundle first (``--trusted-entities`` verifies only Flower
Hub signatures), and a task's input can be pulled only once, so the check has to sit in the
task process between the pull and the unpacking. This module is that executor, written
small on top of Flower's own pieces:

- :func:`serve` is the polling loop (Flower's ``RuntimeHttpClient``, the SuperExec HMAC
  interceptor); it asks for ClientApp tasks only (never agent, connector or model tasks),
  and starts one :func:`run_task` process per task, handing it the token on stdin.
- :func:`run_task` runs Flower's own ``run_clientapp`` with one substitution: its
  ``pull_task_input`` step is wrapped so that, right after the pull and before the bundle
  is unpacked or imported, the bundle's SHA-256 is checked against the site policy (read
  afresh for every task). A refused bundle gets an error reply whose reason is exactly
  ``app-not-approved`` (Flower ``ErrorCode.INVALID_FAB``) and nothing of it touches the
  disk. An approved one is unpacked into a fresh, per-task ``FLWR_HOME`` (so no earlier
  bundle can be loaded instead), and this installation's ``fedmed`` modules are forgotten
  so that the bundle's own code runs, exactly as under ``flwr-clientapp``.

The executor never needs the SuperNode's authentication key: run it as another user or in
another container, with network access to the SuperNode's Runtime API only.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmed.errors import PolicyError, RequestRefused, SecurityError
from fedmed.security.approval import APP_NOT_APPROVED, check_bundle

__all__ = [
    "ExecutorSettings",
    "load_executor_settings",
    "run_task",
    "serve",
    "task_command",
]

_log = logging.getLogger("fedmed.executor")
_ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


class ExecutorSettings(BaseModel):
    """How the executor reaches its SuperNode and which policy it enforces.

    Attributes:
        policy: The site policy (YAML) whose ``approved_apps`` list the runnable bundles.
        runtime_api_address: The SuperNode's Runtime API, ``HOST:PORT``
            (``flower-supernode --host/--port``).
        root_certificates: CA that signed the Runtime API's certificate when the
            SuperNode serves it with TLS (``--ssl-certfile``).
        insecure: Plain HTTP to the Runtime API (loopback, or a network only the SuperNode
            and this executor share); exactly one of this and ``root_certificates``.
        superexec_auth_secret_file: The secret the SuperNode was started with
            (``--superexec-auth-secret-file``): only its holder can acquire tasks.
        poll_interval_s: Seconds between ``acquire-task`` calls.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Path
    runtime_api_address: str = Field(
        default="127.0.0.1:9094", pattern=r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):\d{1,5}$"
    )
    root_certificates: Path | None = None
    insecure: bool = False
    superexec_auth_secret_file: Path | None = None
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _one_transport(self) -> ExecutorSettings:
        if self.insecure == (self.root_certificates is not None):
            raise ValueError(
                "give exactly one of --root-certificates (TLS Runtime API) and --insecure "
                "(plain HTTP on loopback or a private network)"
            )
        return self


def load_executor_settings(**values: Any) -> ExecutorSettings:
    """Validate executor settings; files must exist.

    Raises:
        SecurityError: A value is invalid or a file is missing; the message names it.
    """
    try:
        settings = ExecutorSettings.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "executor"
        raise SecurityError(f"{where}: {first['msg']}") from None
    for name in ("policy", "root_certificates", "superexec_auth_secret_file"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            flag = "--" + name.replace("_", "-")
            raise SecurityError(f"{flag} {path}: expected an existing file, none found")
    return settings


def task_command(settings: ExecutorSettings, parent_pid: int) -> list[str]:
    """The argv of one task process (:func:`run_task` behind ``fedmed site clientapp``)."""
    argv = [
        sys.executable, "-m", "fedmed.cli.main", "site", "clientapp",
        "--policy", str(settings.policy),
        "--runtime-api-address", settings.runtime_api_address,
        "--parent-pid", str(parent_pid),
    ]
    if settings.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(settings.root_certificates)]
    return argv


def _runtime_client(settings: ExecutorSettings, interceptors: list[Any]) -> Any:
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    certificates = (
        None if settings.root_certificates is None else settings.root_certificates.read_bytes()
    )
    return RuntimeHttpClient.from_server_address(
        server_address=settings.runtime_api_address,
        insecure=settings.insecure,
        root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def serve(settings: ExecutorSettings, stop: threading.Event | None = None) -> None:
    """Poll the SuperNode for ClientApp tasks and start a checked task process for each.

    Args:
        settings: Validated settings.
        stop: Set it to return (the CLI sets it on SIGTERM/SIGINT).
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    interceptors: list[Any] = []
    if settings.superexec_auth_secret_file is not None:
        secret = settings.superexec_auth_secret_file.read_bytes()
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[_ACQUIRE_TASK])
        )
    client = _runtime_client(settings, interceptors)
    stop = stop or threading.Event()
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    children: list[subprocess.Popen[bytes]] = []
    _log.info("executor polling %s for ClientApp tasks", settings.runtime_api_address)
    try:
        while not stop.is_set():
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                children.append(_launch(settings, res.token))
                _log.info("task %d of run %d started", res.task.task_id, res.task.run_id)
            children = [c for c in children if c.poll() is None]
            stop.wait(settings.poll_interval_s)
    finally:
        client.close()


def _launch(settings: ExecutorSettings, token: str) -> subprocess.Popen[bytes]:
    # The token goes through a pipe, not argv, where every local user could read it.
    child = subprocess.Popen(task_command(settings, os.getpid()), stdin=subprocess.PIPE)
    assert child.stdin is not None  # stdin=PIPE
    child.stdin.write(token.encode("ascii") + b"\n")
    child.stdin.close()
    return child


def _forget_installed_fedmed() -> None:
    """Drop this installation's ``fedmed`` modules so that the bundle's own are imported.

    Without this, ``import fedmed...`` in the approved bundle would resolve to the modules
    this check already loaded from the hospital's installation, and the code that runs
    would be neither the approved bundle nor what ``flwr-clientapp`` would have run.
    """
    for name in [n for n in sys.modules if n == "fedmed" or n.startswith("fedmed.")]:
        del sys.modules[name]


def _checked_pull(original: Callable[..., Any], policy_path: Path) -> Callable[..., Any]:
    """Wrap Flower's ``pull_task_input`` with the approval check (see the module doc)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supernode.runtime.run_clientapp import push_message

    from fedmed.policy import load_policy

    def pull(client: Any) -> Any:
        message, context, run, fab = original(client)
        try:
            digest = check_bundle(fab.content, fab.hash_str, load_policy(policy_path))
        except (RequestRefused, PolicyError) as exc:
            _log.error("run %s: bundle refused: %s", run.run_id, exc)
            refusal = Error(code=ErrorCode.INVALID_FAB, reason=APP_NOT_APPROVED)
            push_message(client, Message(refusal, reply_to=message), context)
            raise
        _log.info("run %s: bundle %s is approved", run.run_id, digest)
        _forget_installed_fedmed()
        return message, context, run, fab

    return pull


def run_task(settings: ExecutorSettings, token: str, parent_pid: int | None) -> None:
    """Run one ClientApp task with Flower's ``run_clientapp``, bundle checked first.

    Exits the process (Flower's ``flwr_exit``): 0 after a reply, non-zero after a refusal
    or a failure. Runtime dependency installation is never allowed.
    """
    from flwr.supernode.runtime import run_clientapp as flower

    flower.pull_task_input = _checked_pull(flower.pull_task_input, settings.policy)
    certificates = (
        None if settings.root_certificates is None else settings.root_certificates.read_bytes()
    )
    with tempfile.TemporaryDirectory(prefix="fedmed-task-") as home:
        # Flower installs and loads bundles under $FLWR_HOME/apps: a fresh one per task
        # holds only the bundle just checked.
        os.environ["FLWR_HOME"] = home
        flower.run_clientapp(
            runtime_api_address=settings.runtime_api_address,
            token=token,
            insecure=settings.insecure,
            certificates=certificates,
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
