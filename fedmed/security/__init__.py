"""Deployment security: certificates and keys, approved apps, the executor, the proxy."""

from fedmed.security.certs import (
    CertPaths,
    SiteKeyPaths,
    create_site_keys,
    init_ca_and_server,
    parse_san,
    registration_command,
)

__all__ = [
    "CertPaths",
    "SiteKeyPaths",
    "create_site_keys",
    "init_ca_and_server",
    "parse_san",
    "registration_command",
]
