"""A real fedmed deployment on loopback, as docs/deploy.md describes it.

``nginx`` (the public address: TLS, Fleet API only) in front of a ``flower-superlink`` with
TLS and SuperNode authentication bound to 127.0.0.1; per hospital a ``flower-supernode``
in process isolation (its key registered through the operator's connection) and the
hospital's own executor (``fedmed site executor``, a separate process that is not given
the key), enforcing the hospital's site policy. Two ``flwr`` connections: ``operator``
(the SuperLink's internal address, where runs are started and nodes registered) and
``public`` (the proxy, all that a hospital can reach).

:class:`DeployedFederation` starts everything in :meth:`~DeployedFederation.start` and stops
every process it started in :meth:`~DeployedFederation.stop` (also when start fails half
way); use it as a context manager.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from fedmed.policy import SitePolicy
from fedmed.security.certs import (
    CertPaths,
    SiteKeyPaths,
    create_site_keys,
    init_ca_and_server,
    registration_command,
)
from fedmed.security.proxy import load_proxy_settings, nginx_command, write_nginx_config
from tests.support.flower_commands import (
    executor_command,
    flwr_run_command,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from tests.support.processes import ManagedProcess, flower_env, free_port

__all__ = [
    "BIN",
    "OPERATOR",
    "PUBLIC",
    "DeployedFederation",
    "Hospital",
    "snapshot_app",
    "write_policy",
]

BIN = Path(sys.executable).parent
OPERATOR = "operator"
PUBLIC = "public"
_RUN_ID = re.compile(r"Successfully started run (\d+)")


def snapshot_app(source: Path, dest: Path) -> Path:
    """Unpack the bundle Flower builds from ``source`` into ``dest`` (a frozen app copy).

    The working tree may change while a test runs; a copy keeps the approved hash and the
    code that ``flwr run`` submits the same.
    """
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(source))) as fab:
        for name in fab.namelist():
            if not name.startswith(".info/"):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fab.read(name))
    return dest


def write_policy(policy: SitePolicy, path: Path) -> Path:
    """Write a site policy as the YAML a hospital keeps (``load_policy`` reads it back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False))
    return path


@dataclass
class Hospital:
    """One site: its key, policy, SuperExec secret, SuperNode and executor."""

    name: str
    data_dir: Path
    keys: SiteKeyPaths
    policy: Path
    secret: Path
    runtime_port: int
    node: ManagedProcess
    executor: ManagedProcess
    node_id: int = 0


@dataclass
class DeployedFederation:
    """The whole deployment (see the module docstring).

    Attributes:
        root: Working folder (certificates, keys, logs, state).
        sites: ``{site name: data folder}``.
        policies: ``{site name: its site policy}``.
        nginx: Path of the nginx binary (:func:`tests.support.debian.ensure_nginx`).
        fleet_address: Where SuperNodes connect instead of the proxy itself (a capturing
            relay in front of it, for instance); set before :meth:`start`.
    """

    root: Path
    sites: Mapping[str, Path]
    policies: Mapping[str, SitePolicy]
    nginx: str
    fleet_address: str | None = None
    certs: CertPaths = field(init=False)
    env: dict[str, str] = field(init=False)
    superlink_port: int = field(init=False, default_factory=free_port)
    proxy_port: int = field(init=False, default_factory=free_port)
    superlink: ManagedProcess = field(init=False)
    proxy: ManagedProcess = field(init=False)
    hospitals: dict[str, Hospital] = field(init=False, default_factory=dict)
    extra: list[ManagedProcess] = field(init=False, default_factory=list)

    @property
    def public_address(self) -> str:
        """What hospitals connect to (nginx)."""
        return f"127.0.0.1:{self.proxy_port}"

    def _prepare(self) -> None:
        self.certs = init_ca_and_server(self.root / "certs", "localhost", ["127.0.0.1"], 1)
        flwr_home = self.root / "flwr-home"
        write_flwr_config(flwr_home, {
            OPERATOR: (f"127.0.0.1:{self.superlink_port}", self.certs.ca_cert),
            PUBLIC: (self.public_address, self.certs.ca_cert),
        })
        self.env = flower_env(flwr_home=flwr_home, bin_dir=BIN)
        self.env["OMP_NUM_THREADS"] = "1"
        self.superlink = ManagedProcess(
            superlink_command(
                ca_cert=self.certs.ca_cert, server_cert=self.certs.server_cert,
                server_key=self.certs.server_key, host="127.0.0.1", port=self.superlink_port,
                database=self.root / "superlink.db", executable=str(BIN / "flower-superlink"),
            ),
            log_path=self.root / "superlink.log", env=self.env,
            port=("127.0.0.1", self.superlink_port),
        )
        settings = load_proxy_settings(
            listen=self.public_address, server_name="localhost",
            server_cert=self.certs.server_cert, server_key=self.certs.server_key,
            upstream=f"127.0.0.1:{self.superlink_port}", upstream_ca=self.certs.ca_cert,
            upstream_name="localhost", state_dir=self.root / "proxy",
        )
        conf = write_nginx_config(settings, self.root / "proxy" / "nginx.conf")
        self.proxy = ManagedProcess(
            nginx_command(conf, executable=self.nginx), log_path=self.root / "nginx.log",
            port=("127.0.0.1", self.proxy_port),
        )
        for name, data in self.sites.items():
            self.hospitals[name] = self._hospital(name, data)

    def _hospital(self, name: str, data: Path) -> Hospital:
        keys = create_site_keys(self.root / "keys", f"site-{name}")
        policy = write_policy(self.policies[name], self.root / "policies" / f"{name}.yaml")
        secret = self.root / "secrets" / f"{name}.secret"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(f"superexec-{name}-{time.time_ns()}".encode())
        port = free_port()
        node = self.supernode(name, keys.private_key, data=data, policy=policy,
                              secret=secret, runtime_port=port)
        executor = ManagedProcess(
            executor_command(
                policy=policy, runtime_api_address=f"127.0.0.1:{port}",
                superexec_auth_secret_file=secret, executable=str(BIN / "fedmed"),
            ),
            log_path=self.root / f"executor-{name}.log", env=self.env,
        )
        return Hospital(name, data, keys, policy, secret, port, node, executor)

    def supernode(
        self, name: str, key: Path, *, data: Path, policy: Path | None = None,
        secret: Path | None = None, runtime_port: int | None = None, log: str | None = None,
        isolation: str = "process",
    ) -> ManagedProcess:
        """A (not yet started) SuperNode that connects to the public address."""
        argv = supernode_command(
            superlink=self.fleet_address or self.public_address, data_dir=data,
            state_dir=self.root / "state" / name, cache_dir=self.root / "cache" / name,
            site_name=name, root_cert=self.certs.ca_cert, auth_key=key,
            port=runtime_port or free_port(), isolation=isolation, policy=policy,
            superexec_auth_secret_file=secret, executable=str(BIN / "flower-supernode"),
        )
        return ManagedProcess(argv, log_path=self.root / (log or f"node-{name}.log"),
                              env=self.env)

    def flwr(
        self, args: list[str], *, timeout: float = 60, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with this deployment's connections (not checked)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=self.env, cwd=cwd or self.root,
            capture_output=True, text=True, timeout=timeout, check=False,
        )

    def register(self, key: Path, name: str) -> int:
        """Register a SuperNode key through the operator's connection; its node id."""
        argv = registration_command(key, name, OPERATOR)
        done = self.flwr([*argv[1:], "--format", "json"])
        if done.returncode != 0:
            raise RuntimeError(f"registering {name} failed:\n{done.stdout}{done.stderr}")
        return int(json.loads(done.stdout[done.stdout.index("{"):])["node-id"])

    def start(self) -> DeployedFederation:
        """Certificates, SuperLink, proxy, registration, SuperNodes and executors."""
        try:
            self._prepare()
            self.superlink.start()
            self.proxy.start()
            names = list(self.hospitals)
            with ThreadPoolExecutor(max_workers=len(names)) as pool:  # flwr start-up costs
                ids = pool.map(
                    lambda n: self.register(self.hospitals[n].keys.public_key, f"site-{n}"),
                    names,
                )
                for name, node_id in zip(names, ids, strict=True):
                    self.hospitals[name].node_id = node_id
            for hospital in self.hospitals.values():
                hospital.node.start()
            for hospital in self.hospitals.values():
                hospital.executor.start()
            for hospital in self.hospitals.values():
                if not self.superlink.wait_for_log(rf"Activated node_id={hospital.node_id}\b", 60):
                    raise RuntimeError(
                        f"site {hospital.name} was not activated:\n{hospital.node.log_tail()}"
                        f"\n{self.superlink.log_tail()}"
                    )
        except BaseException:
            self.stop()
            raise
        return self

    def run_app(
        self, app: Path, run_config: Mapping[str, str | int | float | bool], *,
        timeout: float = 240,
    ) -> tuple[int, str]:
        """``flwr run APP operator --stream``: blocks until the run ends; (run id, output)."""
        argv = flwr_run_command(app, OPERATOR, run_config, stream=True)
        done = self.flwr([*argv[1:]], timeout=timeout, cwd=app)
        out = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed ({done.returncode}):\n{out[-3000:]}")
        started = [int(x) for x in _RUN_ID.findall(out)]
        if not started:
            raise RuntimeError(f"flwr run printed no run id:\n{out[-3000:]}")
        return started[0], out

    def stop(self) -> None:
        """Stop every process this deployment started (SuperNodes first, in parallel)."""
        procs = [*self.extra]
        for hospital in self.hospitals.values():
            procs += [hospital.node, hospital.executor]
        if procs:
            with ThreadPoolExecutor(max_workers=len(procs)) as pool:
                list(pool.map(ManagedProcess.stop, procs))
        for proc in (getattr(self, "proxy", None), getattr(self, "superlink", None)):
            if proc is not None:
                proc.stop()

    def processes(self) -> list[ManagedProcess]:
        """Every process of the deployment (to check that all have exited)."""
        procs = [self.superlink, self.proxy, *self.extra]
        for hospital in self.hospitals.values():
            procs += [hospital.node, hospital.executor]
        return procs

    def __enter__(self) -> DeployedFederation:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
