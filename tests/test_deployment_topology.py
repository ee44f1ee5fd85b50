"""A real Flower 1.41 SuperLink with TLS + SuperNode authentication on loopback.

Checks what a hospital deployment relies on: plaintext clients are refused, an unregistered
SuperNode is refused, a registered one joins. Every process is stopped in ``finally``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmed.errors import FederationError, SecurityError
from fedmed.federation.deployment import (
    ManagedProcess,
    flower_env,
    free_port,
    node_config_string,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from fedmed.security.certs import (
    CertPaths,
    create_site_keys,
    init_ca_and_server,
    registration_command,
)

BIN = Path(sys.executable).parent
CONNECTION = "fedmed-test"

pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=str(BIN)) is None,
    reason="flower-superlink is not installed next to this interpreter",
)


@dataclass
class Federation:
    tmp: Path
    certs: CertPaths
    address: str
    env: dict[str, str]
    superlink: ManagedProcess


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    tmp = tmp_path_factory.mktemp("deploy")
    certs = init_ca_and_server(tmp / "certs", "localhost", ["127.0.0.1"], 1)
    port = free_port()
    address = f"127.0.0.1:{port}"
    flwr_home = tmp / "flwr-home"
    write_flwr_config(flwr_home, {CONNECTION: (address, certs.ca_cert)})
    env = flower_env(flwr_home=flwr_home, bin_dir=BIN)
    env["OMP_NUM_THREADS"] = "1"
    argv = superlink_command(
        ca_cert=certs.ca_cert,
        server_cert=certs.server_cert,
        server_key=certs.server_key,
        host="127.0.0.1",
        port=port,
        executable=str(BIN / "flower-superlink"),
    )
    superlink = ManagedProcess(
        argv, log_path=tmp / "superlink.log", env=env, port=("127.0.0.1", port)
    )
    try:
        superlink.start()
        assert superlink.wait_for_log(r"Uvicorn running on https://", 30), superlink.log_tail()
        yield Federation(tmp, certs, address, env, superlink)
    finally:
        superlink.stop()
    assert superlink.returncode is not None


def _node(fed: Federation, name: str, **kwargs: object) -> ManagedProcess:
    (fed.tmp / name).mkdir(exist_ok=True)
    argv = supernode_command(
        superlink=fed.address,
        data_dir=fed.tmp / name / "data",
        state_dir=fed.tmp / name / "state",
        site_name=name,
        port=free_port(),
        executable=str(BIN / "flower-supernode"),
        **kwargs,  # type: ignore[arg-type]
    )
    return ManagedProcess(argv, log_path=fed.tmp / f"{name}.log", env=fed.env)


def test_superlink_command_is_secure_by_default(tmp_path: Path) -> None:
    certs = init_ca_and_server(tmp_path, "localhost", [], 1)
    argv = superlink_command(
        ca_cert=certs.ca_cert, server_cert=certs.server_cert, server_key=certs.server_key
    )
    assert argv[argv.index("--ssl-certfile") + 1] == str(certs.server_cert)
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    with pytest.raises(SecurityError, match="--ssl-ca-certfile"):
        superlink_command()
    with pytest.raises(SecurityError, match="--insecure"):
        superlink_command(insecure=True)
    with pytest.warns(UserWarning, match="TLS is OFF"):
        assert "--insecure" in superlink_command(insecure=True, node_auth=False)
    with pytest.raises(SecurityError, match="--auth-supernode-private-key"):
        supernode_command(
            superlink="h:8000", data_dir="/d", state_dir="/s", root_cert=certs.ca_cert
        )
    with pytest.raises(FederationError, match="HOST:PORT"):
        supernode_command(superlink="https://h:8000", data_dir="/d", state_dir="/s")


def test_node_config_round_trips_through_flower_parser() -> None:
    from flwr.common.config import parse_config_args

    text = node_config_string(
        "/data/site a", "/state", site_name="h1", cache_dir="/c", device="cuda:0"
    )
    assert parse_config_args([text]) == {
        "data-dir": "/data/site a",
        "state-dir": "/state",
        "site-name": "h1",
        "cache-dir": "/c",
        "device": "cuda:0",
    }
    with pytest.raises(FederationError, match="data-dir"):
        node_config_string("/it's", "/s")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_plaintext_clients_are_refused(federation: Federation) -> None:
    # A plain-HTTP request to the TLS port gets no HTTP answer.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{federation.address}/health", timeout=5)
    with pytest.warns(UserWarning, match="TLS is OFF"):
        node = _node(federation, "plain", insecure=True, max_retries=0)
    with node:
        code = node.wait(timeout=30)
        log = node.log_text()
    assert code not in (None, 0), log
    assert "Failed to initialize the connection to the SuperLink" in log


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unregistered_supernode_refused_registered_joins(federation: Federation) -> None:
    keys = federation.tmp / "keys"
    outsider = create_site_keys(keys, "outsider")
    member = create_site_keys(keys, "member")

    with _node(
        federation,
        "outsider",
        root_cert=federation.certs.ca_cert,
        auth_key=outsider.private_key,
        max_retries=0,
    ) as node:
        code = node.wait(timeout=30)
        log = node.log_text()
    assert code not in (None, 0), log
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation.superlink.log_text()

    # The coordinator registers the member's public key through the Control API.
    register = registration_command(member.public_key, "member", CONNECTION)
    register[0] = str(BIN / "flwr")
    done = subprocess.run(
        [*register, "--format", "json"],
        env=federation.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    node_id = json.loads(done.stdout[done.stdout.index("{") :])["node-id"]

    with _node(
        federation,
        "member",
        root_cert=federation.certs.ca_cert,
        auth_key=member.private_key,
        max_retries=0,
    ) as node:
        activated = federation.superlink.wait_for_log(
            rf"\[Fleet\.ActivateNode\] Activated node_id={node_id}", 30
        )
        assert activated, federation.superlink.log_tail() + "\n" + node.log_tail()
        assert node.returncode is None, node.log_tail()
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=federation.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        nodes = json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]
        status = {n["node-id"]: n["status"] for n in nodes}
        assert status[str(node_id)] == "online"
    assert node.returncode is not None


# ---- deploy/: Dockerfiles and compose files ------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("compose*.yml"))
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")
TLS_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")


def _compose(name: str) -> dict:
    import yaml

    return yaml.safe_load((DEPLOY / name).read_text())


def _mounts(service: dict) -> list[dict]:
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):  # short syntax "src:dst[:ro]"
            parts = volume.split(":")
            out.append({"source": parts[0], "target": parts[1], "read_only": "ro" in parts[2:]})
        else:
            out.append(volume)
    return out


def test_compose_files_exist_and_parse() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {
        "compose.coordinator.yml",
        "compose.hospital.yml",
        "compose.hospital-cuda.yml",
        "compose.demo.yml",
    } <= names
    for path in COMPOSE_FILES:
        assert isinstance(_compose(path.name).get("services"), dict), path


@pytest.mark.parametrize(
    "name", ["compose.coordinator.yml", "compose.hospital.yml", "compose.demo.yml"]
)
def test_compose_invariants(name: str) -> None:
    services = _compose(name)["services"]
    superlinks = [s for s in services.values() if _has(s, "--enable-supernode-auth")]
    supernodes = [s for s in services.values() if _has(s, "--auth-supernode-private-key")]
    assert superlinks or supernodes, name
    for service_name, service in services.items():
        command = [str(c) for c in service.get("command", [])]
        assert "--insecure" not in command, (name, service_name)
        # Non-root: an explicit numeric uid that is not 0.
        assert str(service.get("user", "0")).split(":")[0] not in ("0", "root"), service_name
        mounts = {m["target"]: m for m in _mounts(service)}
        # Every certificate/key mount is read-only.
        for target, mount in mounts.items():
            if "/certificates" in target or "/keys" in target:
                assert mount.get("read_only") is True, (service_name, target)
    for service in superlinks:
        command = [str(c) for c in service["command"]]
        for flag in TLS_FLAGS:
            cert_path = command[command.index(flag) + 1]
            assert any(cert_path.startswith(t) for t in _targets(service)), (flag, cert_path)
        assert "--disable-runtime-dependency-installation" in command
    for service in supernodes:
        command = [str(c) for c in service["command"]]
        root = command[command.index("--root-certificates") + 1]
        key = command[command.index("--auth-supernode-private-key") + 1]
        targets = _targets(service)
        assert root in targets and key in targets
        node_config = command[command.index("--node-config") + 1]
        assert "data-dir='/data'" in node_config and "state-dir=" in node_config
        data = {m["target"]: m for m in _mounts(service)}["/data"]
        assert data["read_only"] is True


def _has(service: dict, flag: str) -> bool:
    return flag in [str(c) for c in service.get("command", [])]


def _targets(service: dict) -> set[str]:
    return {m["target"] for m in _mounts(service)} | {
        str(Path(m["target"]).parent) + "/" for m in _mounts(service)
    }


def test_demo_has_one_coordinator_and_three_hospitals() -> None:
    services = _compose("compose.demo.yml")["services"]
    nodes = [s for s in services.values() if "--auth-supernode-private-key" in s.get("command", [])]
    assert len(nodes) == 3
    sites = {m["source"] for s in nodes for m in _mounts(s) if m["target"] == "/data"}
    assert len(sites) == 3 and all(s.startswith("../demo-federation/") for s in sites)


def test_cuda_override_reserves_a_gpu() -> None:
    service = _compose("compose.hospital-cuda.yml")["services"]["supernode"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert service["build"]["dockerfile"].endswith("Dockerfile.hospital-cuda")


def test_dockerfiles_pin_versions_and_drop_root() -> None:
    import re

    assert {p.name for p in DOCKERFILES} == {
        "Dockerfile.coordinator",
        "Dockerfile.hospital",
        "Dockerfile.hospital-cuda",
    }
    for path in DOCKERFILES:
        text = path.read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert froms and all(":" in f and not f.endswith(":latest") for f in froms), path
        users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
        assert users and users[-1] not in ("0", "root"), path
        assert "TORCH_VERSION=2.13.0" in text and "FLWR_VERSION=1.41.0" in text, path
        assert (DEPLOY / f"{path.name}.dockerignore").is_file(), path


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfiles_lint_clean() -> None:
    done = subprocess.run(
        ["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
