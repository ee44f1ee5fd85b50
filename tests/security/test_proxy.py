"""The coordinator's proxy config: only Flower 1.42's Fleet API routes, valid for nginx.

Real traffic through it (SuperNodes authenticated through the proxy, Control API refused)
runs in ``tests/federation/test_deployment_e2e.py``.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from fedmed.cli.main import main
from fedmed.errors import SecurityError
from fedmed.security.certs import init_ca_and_server
from fedmed.security.proxy import (
    FLEET_PATHS,
    load_proxy_settings,
    nginx_command,
    nginx_config,
    write_nginx_config,
)
from tests.support.debian import NginxUnavailable, ensure_nginx


def _settings(tmp: Path, **changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "listen": "127.0.0.1:8443", "server_name": "localhost",
        "server_cert": tmp / "server.pem", "server_key": tmp / "server.key",
        "upstream": "127.0.0.1:8000", "upstream_ca": tmp / "ca.crt",
        "state_dir": tmp / "state",
    }
    values.update(changes)
    return values


def _location_regex(config: str) -> re.Pattern[str]:
    (pattern,) = re.findall(r"location ~ (\S+) \{", config)
    return re.compile(pattern)


def test_fleet_paths_are_exactly_flowers_fleet_api() -> None:
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode import fleet_http_client

    assert set(FLEET_PATHS) == {getattr(route, "path", "") for route in router.routes}
    used = set(re.findall(r'path="([^"]+)"', inspect.getsource(fleet_http_client)))
    assert used == set(FLEET_PATHS)  # every call a SuperNode makes, and nothing else


def test_only_fleet_routes_pass_the_proxy(tmp_path: Path) -> None:
    from flwr.superlink.main import create_app

    config = nginx_config(load_proxy_settings(**_settings(tmp_path)))
    regex = _location_regex(config)
    routes = set(create_app().openapi()["paths"])  # every route the SuperLink serves
    assert any(r.startswith("/v1/control/") for r in routes)
    assert any(r.startswith("/v1/runtime/") for r in routes)
    assert {r for r in routes if regex.fullmatch(r)} == set(FLEET_PATHS)
    assert not regex.fullmatch("/v1/fleet/pull-messages/../../control/start-run")
    assert "return 403" in config and "limit_except POST" in config
    assert "proxy_ssl_verify on;" in config and "proxy_pass https://" in config


def test_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="listen"):
        load_proxy_settings(**_settings(tmp_path, listen="https://0.0.0.0:443"))
    with pytest.raises(SecurityError, match="state_dir"):
        load_proxy_settings(**_settings(tmp_path, state_dir="relative"))
    with pytest.raises(SecurityError, match="max_body"):
        load_proxy_settings(**_settings(tmp_path, max_body="64 MB"))
    bad = load_proxy_settings(**_settings(tmp_path, server_cert=tmp_path / "a;b.pem"))
    with pytest.raises(SecurityError, match="syntax"):
        nginx_config(bad)
    with pytest.raises(SecurityError, match="server.pem"):
        write_nginx_config(load_proxy_settings(**_settings(tmp_path)), tmp_path / "n.conf")


@pytest.mark.parametrize("logs", ["files", "stdio"])
def test_generated_config_is_valid_for_the_installed_nginx(tmp_path: Path, logs: str) -> None:
    try:
        nginx = ensure_nginx()
    except NginxUnavailable as exc:
        pytest.skip(str(exc))
    certs = init_ca_and_server(tmp_path / "certs", "localhost", ["127.0.0.1"], 1)
    settings = load_proxy_settings(**_settings(
        tmp_path, server_cert=certs.server_cert, server_key=certs.server_key,
        upstream_ca=certs.ca_cert, logs=logs,
    ))
    conf = write_nginx_config(settings, tmp_path / "nginx.conf")
    argv = nginx_command(conf, executable=nginx)
    done = subprocess.run([*argv[:-2], "-t"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_proxy_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = init_ca_and_server(tmp_path / "certs", "coordinator.example.org", [], 1)
    out = tmp_path / "nginx.conf"
    argv = ["proxy", "config", "--certs", str(certs.ca_cert.parent), "--server-name",
            "coordinator.example.org", "--out", str(out), "--state-dir", str(tmp_path / "s")]
    assert main(argv) == 0
    text = out.read_text()
    assert f'ssl_certificate "{certs.server_cert}";' in text
    assert "server 127.0.0.1:8000;" in text and "listen 0.0.0.0:443 ssl;" in text
    assert (tmp_path / "s").is_dir()
    # Missing certificates, bad address: exit 1 with a message, no traceback.
    assert main([*argv[:3], str(tmp_path / "nowhere"), *argv[4:]]) == 1
    assert main([*argv, "--upstream", "superlink"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fedmed certs init" in err and "upstream" in err
