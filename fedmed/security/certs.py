"""Certificates and keys for a Flower 1.42 deployment, made with ``cryptography``.

Two kinds of material, each in the exact format Flower 1.42 reads:

- TLS: a private CA (self-signed, ``basicConstraints CA:TRUE``) and the SuperLink's server
  key + certificate signed by it, with ``subjectAltName`` = the server name and every extra
  name. The SuperLink takes them as ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``;
  SuperNodes and the ``flwr`` CLI take the CA as root certificate.
- SuperNode authentication: an ECDSA key pair on a NIST curve (P-384 here).
  ``flower-supernode --auth-supernode-private-key`` loads the private key with
  ``cryptography``'s ``load_ssh_private_key`` (so it must be in OpenSSH format), and
  ``flwr supernode register`` loads the public key with ``load_ssh_public_key``
  (``ecdsa-sha2-nistp384 AAAA...``).

Which app bundles may run at a hospital is the hospital's site policy
(:mod:`fedmed.security.approval`), not a signing key: Flower's ``--trusted-entities``
verifies only Flower Hub signatures.

Private keys are created with mode 0600 at ``open`` time, never widened and then narrowed.
Existing files are never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.errors import SecurityError

__all__ = [
    "CertPaths",
    "SiteKeyPaths",
    "create_site_keys",
    "init_ca_and_server",
    "parse_san",
    "registration_command",
]

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertPaths:
    """Files written by :func:`init_ca_and_server`.

    Attributes:
        ca_cert: The CA certificate (PEM); the root certificate everyone trusts.
        ca_key: The CA private key (PEM, 0600); keep it offline after issuing.
        server_cert: The SuperLink certificate (PEM) signed by the CA.
        server_key: The SuperLink private key (PEM, 0600).
    """

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class SiteKeyPaths:
    """Files written by :func:`create_site_keys`.

    Attributes:
        private_key: OpenSSH-format ECDSA P-384 private key (0600), stays at the site.
        public_key: OpenSSH-format public key (``ecdsa-sha2-nistp384 ...``), sent to the
            coordinator for ``flwr supernode register``.
    """

    private_key: Path
    public_key: Path


def parse_san(value: str) -> x509.GeneralName:
    """Turn a host name or IP address into the matching subjectAltName entry.

    Args:
        value: ``"coordinator.example.org"``, ``"localhost"``, ``"10.0.0.5"`` or ``"::1"``.

    Returns:
        ``x509.IPAddress`` for a literal IPv4/IPv6 address, else ``x509.DNSName``.

    Raises:
        SecurityError: ``value`` is empty or contains characters a DNS name cannot have.
    """
    text = value.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    # Hostnames: letters, digits, hyphens, dots, and a leading wildcard label.
    if not text or not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text):
        raise SecurityError(
            f"subjectAltName {value!r}: expected a DNS name (e.g. coordinator.example.org) "
            "or an IP address (e.g. 10.0.0.5); fix the --server-name/--san value"
        )
    return x509.DNSName(text)


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with ``mode`` set at creation time.

    ``O_EXCL`` makes the no-overwrite rule atomic; with ``force`` the old file is removed
    first so that the new one is created (with ``mode``) rather than truncated in place,
    which would keep the old file's permissions.
    """
    if path.exists() or path.is_symlink():
        if not force:
            raise SecurityError(
                f"{path} already exists; refusing to overwrite it. "
                "Pass --force (force=True) to replace it, or choose another --out directory"
            )
        path.unlink()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise SecurityError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _check_targets(paths: Iterable[Path], force: bool) -> None:
    """Refuse before writing anything, so a refused call leaves no half-written set."""
    if force:
        return
    for path in paths:
        if path.exists():
            raise SecurityError(
                f"{path} already exists; refusing to overwrite it. "
                "Pass --force (force=True) to replace it, or choose another --out directory"
            )


def _make_dir(out: Path) -> Path:
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SecurityError(f"cannot create output directory {out}: {exc.strerror}") from exc
    return out


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca_and_server(
    out: Path | str,
    server_name: str,
    sans: Sequence[str] = (),
    days: int = 365,
    *,
    force: bool = False,
) -> CertPaths:
    """Create a CA and the SuperLink's TLS key + certificate signed by it.

    Files: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` under ``out``.

    Args:
        out: Output directory (created if missing).
        server_name: The name SuperNodes use to reach the SuperLink (DNS name or IP); it
            becomes the certificate's CN and first subjectAltName.
        sans: Further names/IPs, e.g. ``["localhost", "127.0.0.1"]``. ``127.0.0.1`` is
            needed when the SuperLink runs the ServerApp in subprocess isolation, because
            its own SuperExec then connects to ``127.0.0.1:<port>`` over TLS.
        days: Validity of both certificates.
        force: Replace existing files.

    Returns:
        The written paths.

    Raises:
        SecurityError: Bad name or ``days``, or a file exists and ``force`` is false.
    """
    if days < 1:
        raise SecurityError(f"--days: expected a positive number of days, got {days}")
    names: list[x509.GeneralName] = []
    for value in [server_name, *sans]:
        entry = parse_san(value)
        if entry not in names:
            names.append(entry)

    out = _make_dir(Path(out))
    paths = CertPaths(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    _check_targets(
        [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force
    )

    now = _dt.datetime.now(_dt.timezone.utc)
    # Backdate a little so that sites with a slightly slow clock accept the certificate.
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmed federation CA")])
    ca_cert = _ca_certificate(ca_key, ca_name, not_before, not_after)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(
        server_key, server_name, names, (ca_key, ca_name), not_before, not_after
    )

    _write_new(paths.ca_key, _pem_private(ca_key), _PRIVATE_MODE, force)
    _write_new(paths.server_key, _pem_private(server_key), _PRIVATE_MODE, force)
    pem = serialization.Encoding.PEM
    _write_new(paths.ca_cert, ca_cert.public_bytes(pem), _PUBLIC_MODE, force)
    _write_new(paths.server_cert, server_cert.public_bytes(pem), _PUBLIC_MODE, force)
    return paths


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a TLS server signs and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name,
    not_before: _dt.datetime, not_after: _dt.datetime,
) -> x509.Certificate:
    """The federation's self-signed CA certificate (may sign server certificates only)."""
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey, server_name: str, names: list[x509.GeneralName],
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name],
    not_before: _dt.datetime, not_after: _dt.datetime,
) -> x509.Certificate:
    """A TLS server certificate for ``server_name`` (+ ``names``) signed by the CA."""
    ca_key, ca_name = issuer
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _check_name(name: str, what: str) -> None:
    if not _SITE_NAME.fullmatch(name):
        raise SecurityError(
            f"--name {name!r}: expected a {what} name of letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )


def create_site_keys(out: Path | str, name: str, *, force: bool = False) -> SiteKeyPaths:
    """Create a site's SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -C NAME -f OUT/NAME``, the recipe
    Flower documents: the private key is what ``flower-supernode
    --auth-supernode-private-key`` loads; the ``.pub`` file is what the coordinator passes
    to ``flwr supernode register``.

    Args:
        out: Output directory (created if missing).
        name: Site name; files are ``NAME`` (private) and ``NAME.pub``.
        force: Replace existing files.

    Returns:
        The written paths.

    Raises:
        SecurityError: Invalid name, or a file exists and ``force`` is false.
    """
    _check_name(name, "site")
    out = _make_dir(Path(out))
    paths = SiteKeyPaths(private_key=out / name, public_key=out / f"{name}.pub")
    _check_targets([paths.private_key, paths.public_key], force)

    _write_openssh_pair(ec.generate_private_key(ec.SECP384R1()), paths, name, force)
    return paths


def registration_command(public_key: Path | str, site_name: str, connection: str) -> list[str]:
    """The coordinator's command that registers a site's public key with the SuperLink.

    Flower 1.42 has no key list file: ``flower-superlink --enable-supernode-auth`` only
    accepts SuperNodes whose public key was registered through the Control API with
    ``flwr supernode register PUBLIC_KEY CONNECTION --name NAME``.

    Args:
        public_key: The site's ``NAME.pub`` file.
        site_name: Shown by ``flwr supernode list``.
        connection: Name of the ``[superlink.<name>]`` entry in the flwr config.

    Returns:
        The argv list.
    """
    return ["flwr", "supernode", "register", str(public_key), connection, "--name", site_name]


def _write_openssh_pair(key: Any, paths: Any, comment: str, force: bool) -> None:
    """Write ``key`` as an OpenSSH private key (0600) and public key (0644, with a comment)."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_new(paths.private_key, private, _PRIVATE_MODE, force)
    _write_new(paths.public_key, public + f" {comment}\n".encode(), _PUBLIC_MODE, force)
