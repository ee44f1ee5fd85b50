"""Certificates and keys for deployment (TLS, SuperNode authentication, app trust)."""

from fedmed.security.certs import (
    CertPaths,
    PublisherKeyPaths,
    SiteKeyPaths,
    create_publisher_keys,
    create_site_keys,
    init_ca_and_server,
    parse_san,
    registration_command,
    write_trusted_entities,
)

__all__ = [
    "CertPaths",
    "PublisherKeyPaths",
    "SiteKeyPaths",
    "create_publisher_keys",
    "create_site_keys",
    "init_ca_and_server",
    "parse_san",
    "registration_command",
    "write_trusted_entities",
]
