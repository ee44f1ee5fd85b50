"""Certificates and keys: chain, SANs, permissions, overwrite refusal, Flower's loaders."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmed.cli.main import main
from fedmed.errors import SecurityError
from fedmed.security.certs import (
    create_site_keys,
    init_ca_and_server,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("certs")
    return init_ca_and_server(
        out, "coordinator.example.org", ["localhost", "127.0.0.1", "10.1.2.3", "::1"], 30
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_chain_verifies(certs) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    # Raises if the issuer/signature/validity do not chain.
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # The server key on disk is the one certified.
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()


def test_chain_rejects_foreign_ca(certs, tmp_path: Path) -> None:
    other = init_ca_and_server(tmp_path, "other", [], 1)
    foreign_ca = x509.load_pem_x509_certificate(other.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    with pytest.raises((InvalidSignature, ValueError, TypeError)):
        server.verify_directly_issued_by(foreign_ca)


def test_sans_exactly_as_given(certs) -> None:
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]
    assert len(list(san)) == 5


def test_key_modes(certs, tmp_path: Path) -> None:
    assert _mode(certs.ca_key) == 0o600
    assert _mode(certs.server_key) == 0o600
    assert _mode(certs.ca_cert) == 0o644
    site = create_site_keys(tmp_path, "hospital-a")
    assert _mode(site.private_key) == 0o600


def test_site_keys_load_with_flower_loaders(tmp_path: Path) -> None:
    paths = create_site_keys(tmp_path, "hospital-b")
    # What flower-supernode --auth-supernode-private-key does.
    private = load_ssh_private_key(paths.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    # What `flwr supernode register` does (try_load_public_key).
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    registered = try_load_public_key(paths.public_key)
    assert registered == public_key_to_bytes(private.public_key())
    assert paths.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_cli_refuses_overwrite_without_force(tmp_path: Path, capsys) -> None:
    args = ["certs", "init", "--out", str(tmp_path), "--server-name", "localhost"]
    assert main(args) == 0
    before = (tmp_path / "ca.key").read_bytes()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "ca.crt" in err and "--force" in err
    assert (tmp_path / "ca.key").read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != before
    assert _mode(tmp_path / "ca.key") == 0o600


def test_cli_site_refuses_overwrite_and_prints_registration(tmp_path: Path, capsys) -> None:
    args = ["certs", "site", "--name", "h1", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "flwr supernode register" in out and "h1.pub" in out
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_api_refusal_names_file_and_flag(tmp_path: Path) -> None:
    create_site_keys(tmp_path, "s")
    with pytest.raises(SecurityError, match=r"s\b.*--force"):
        create_site_keys(tmp_path, "s")


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="--days"):
        init_ca_and_server(tmp_path, "x", [], 0)
    with pytest.raises(SecurityError, match="subjectAltName"):
        init_ca_and_server(tmp_path, "bad name!", [], 1)
    with pytest.raises(SecurityError, match="--name"):
        create_site_keys(tmp_path, "../evil")
