"""The deployment's topology: a real Flower 1.42 SuperLink, and the files in deploy/.

A SuperLink with TLS + SuperNode authentication on loopback (no proxy: what the SuperLink
itself enforces): plaintext clients are refused, an unregistered SuperNode is refused, a
registered one joins. Docker does not run here, so the compose files' security invariants
(secrets, separate executors, the proxy, no ``ca.key``) are checked on the parsed files, and
the same topology runs natively in ``test_deployment_e2e.py``. Every process is stopped in
``finally``.
"""

from __future__ import annotations

import json
import re
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
from fedmed.security.certs import (
    CertPaths,
    create_site_keys,
    init_ca_and_server,
    registration_command,
)
from tests.support.flower_commands import (
    executor_command,
    node_config_string,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from tests.support.processes import ManagedProcess, flower_env, free_port

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


def test_executor_command_never_names_the_node_key(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    argv = executor_command(
        policy=policy, runtime_api_address="127.0.0.1:9094", superexec_auth_secret_file=secret
    )
    assert argv[:3] == ["fedmed", "site", "executor"] and "--insecure" in argv
    assert not any("key" in a and "secret" not in a for a in argv), argv


# ---- deploy/: Dockerfiles and compose files ------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("compose*.yml"))
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")
TLS_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile")
FULL = ("compose.coordinator.yml", "compose.hospital.yml", "compose.demo.yml")
SECRET_SUFFIXES = (".crt", ".pem", ".key", ".secret")


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


def _command(service: dict) -> list[str]:
    return [str(c) for c in service.get("command", [])]


def _arg(service: dict, flag: str) -> str:
    command = _command(service)
    return command[command.index(flag) + 1]


def _secrets(service: dict) -> dict[str, str]:
    """``{path in the container: top-level secret name}``."""
    out = {}
    for entry in service.get("secrets", []):
        source = entry if isinstance(entry, str) else entry["source"]
        target = source if isinstance(entry, str) else entry.get("target", source)
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = source
    return out


def _kind(service: dict) -> str:
    command = _command(service)
    if "--enable-supernode-auth" in command:
        return "superlink"
    if "--auth-supernode-private-key" in command:
        return "supernode"
    if command[:2] == ["site", "executor"]:
        return "executor"
    if "--runtime-api-address" in command:
        return "serverapp"
    if str(service.get("image", "")).startswith("nginx:"):
        return "proxy"
    return "other"


def _internal_only(doc: dict, service: dict) -> bool:
    nets = service.get("networks", [])
    return bool(nets) and all(doc["networks"][n].get("internal") is True for n in nets)


def test_compose_files_exist_and_parse() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {*FULL, "compose.hospital-cuda.yml"} <= names
    for path in COMPOSE_FILES:
        assert isinstance(_compose(path.name).get("services"), dict), path


@pytest.mark.parametrize("name", FULL)
def test_keys_and_certificates_are_compose_secrets_and_ca_key_is_nowhere(name: str) -> None:
    doc = _compose(name)
    assert "ca.key" not in "\n".join(
        line for line in (DEPLOY / name).read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    for service_name, service in doc["services"].items():
        for mount in _mounts(service):
            text = f"{mount.get('source', '')} {mount['target']}"
            assert not any(s in text for s in ("certs", "keys", "secrets", *SECRET_SUFFIXES)), (
                service_name, mount)
        for source in _secrets(service).values():
            assert source in doc["secrets"], (service_name, source)
    assert all("ca.key" not in str(s["file"]) for s in doc["secrets"].values())


@pytest.mark.parametrize("name", FULL)
def test_compose_invariants(name: str) -> None:
    doc = _compose(name)
    services = doc["services"]
    kinds: dict[str, list[dict]] = {}
    for service_name, service in services.items():
        kinds.setdefault(_kind(service), []).append(service)
        # Non-root: an explicit numeric uid that is not 0.
        assert str(service.get("user", "0")).split(":")[0] not in ("0", "root"), service_name
        if _kind(service) in ("superlink", "supernode", "serverapp"):
            assert "--insecure" not in _command(service), service_name
        # Only the proxy publishes beyond this host.
        for port in service.get("ports", []):
            assert _kind(service) == "proxy" or str(port).startswith("127.0.0.1:"), port
    assert "other" not in kinds, kinds["other"]
    for service in kinds.get("superlink", []):
        secrets = _secrets(service)
        for flag in (*TLS_FLAGS, "--superexec-auth-secret-file"):
            assert _arg(service, flag) in secrets, flag
        assert _arg(service, "--isolation") == "process"
        assert "--disable-runtime-dependency-installation" in _command(service)
    for service in kinds.get("serverapp", []):
        assert _arg(service, "--superexec-auth-secret-file") in _secrets(service)
        assert _internal_only(doc, service)
    for service in kinds.get("supernode", []):
        secrets = _secrets(service)
        for flag in ("--root-certificates", "--auth-supernode-private-key",
                     "--superexec-auth-secret-file"):
            assert _arg(service, flag) in secrets, flag
        assert _arg(service, "--isolation") == "process"
        node_config = _arg(service, "--node-config")
        assert all(f"{k}=" in node_config for k in ("data-dir", "state-dir", "policy"))
        assert not _mounts(service), "the data lives with the executor, not the SuperNode"
    for service in kinds.get("executor", []):
        secrets = _secrets(service)
        assert _arg(service, "--superexec-auth-secret-file") in secrets
        # Never the SuperNode's authentication key; no network but the one to its SuperNode.
        assert all("key" not in source for source in secrets.values()), secrets
        assert _internal_only(doc, service)
        mounts = {m["target"]: m for m in _mounts(service)}
        assert mounts["/data"]["read_only"] is True
        assert mounts[_arg(service, "--policy")]["read_only"] is True
    if name != "compose.hospital.yml":
        (proxy,) = kinds["proxy"]
        assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", proxy["image"])
        config = doc["configs"][proxy["configs"][0]["source"]]["file"]
        assert (DEPLOY / config).resolve() == (DEPLOY / "proxy" / "nginx.conf").resolve()
        assert set(_secrets(proxy)) == {f"/run/secrets/{n}" for n in (
            "server.pem", "server.key", "ca.crt")}
    # Every SuperNode and its executor share exactly one private network and one secret.
    for node in kinds.get("supernode", []):
        (executor,) = [
            e for e in kinds["executor"]
            if set(e["networks"]) & set(node["networks"])
        ]
        assert set(_secrets(executor).values()) <= set(_secrets(node).values())
        host = _arg(executor, "--runtime-api-address").split(":")[0]
        assert host in services and services[host] is node


def test_shipped_proxy_config_is_what_fedmed_generates() -> None:
    from fedmed.security.proxy import load_proxy_settings, nginx_config

    settings = load_proxy_settings(
        listen="0.0.0.0:8443", server_name="coordinator.example.org",
        server_cert="/run/secrets/server.pem", server_key="/run/secrets/server.key",
        upstream="superlink:8000", upstream_ca="/run/secrets/ca.crt",
        upstream_name="superlink", state_dir="/tmp", logs="stdio",
    )
    assert (DEPLOY / "proxy" / "nginx.conf").read_text() == nginx_config(settings)
    proxy = _compose("compose.coordinator.yml")["services"]["proxy"]
    assert proxy["ports"] == ["443:8443"]
    assert proxy["tmpfs"] == ["/tmp"] and proxy["read_only"] is True


def test_demo_has_one_coordinator_and_three_hospitals() -> None:
    services = _compose("compose.demo.yml")["services"]
    nodes = [s for s in services.values() if _kind(s) == "supernode"]
    executors = [s for s in services.values() if _kind(s) == "executor"]
    assert len(nodes) == 3 and len(executors) == 3
    sites = {m["source"] for s in executors for m in _mounts(s) if m["target"] == "/data"}
    assert len(sites) == 3 and all(s.startswith("../demo-federation/") for s in sites)
    assert {_arg(n, "--superlink") for n in nodes} == {"proxy:8443"}


def test_cuda_override_reserves_a_gpu_for_the_executor() -> None:
    service = _compose("compose.hospital-cuda.yml")["services"]["executor"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert service["build"]["dockerfile"].endswith("Dockerfile.hospital-cuda")
    assert "executor" in _compose("compose.hospital.yml")["services"]


def test_dockerfiles_pin_versions_and_drop_root() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "Dockerfile.coordinator",
        "Dockerfile.hospital",
        "Dockerfile.hospital-cuda",
    }
    from importlib.metadata import version

    for path in DOCKERFILES:
        text = path.read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert froms and all(":" in f and not f.endswith(":latest") for f in froms), path
        users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
        assert users and users[-1] not in ("0", "root"), path
        # The images carry the Flower version this checkout is tested with.
        assert f"FLWR_VERSION={version('flwr')}" in text, path
        assert "TORCH_VERSION=2.13.0" in text, path
        assert (DEPLOY / f"{path.name}.dockerignore").is_file(), path
    for name in FULL:
        for service in _compose(name)["services"].values():
            image = str(service.get("image", ""))
            if image.startswith("flwr/"):
                assert image.endswith(f":{version('flwr')}"), image


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_dockerfiles_lint_clean() -> None:
    done = subprocess.run(
        ["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
