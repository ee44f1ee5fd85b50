"""Which code may run next to a hospital's data: app bundles approved by their hash.

What runs at a site is the ClientApp inside the app bundle (FAB) the coordinator submits:
a zip of the coordinator's project, which Flower unpacks and puts first on ``sys.path``, so
its own ``fedmed/`` shadows the hospital's installation. A hospital therefore approves
bundles, not releases: it records the SHA-256 of the exact FAB bytes in its site policy
(``fedmed site approve``), and its executor refuses every other bundle before unpacking it.

The hash is the one Flower itself uses for a FAB (``hashlib.sha256(fab_bytes).hexdigest()``
in ``flwr run``, ``flwr build`` and the SuperNode's app folder names). ``flwr build`` is
deterministic (sorted files, fixed zip dates), so a hospital can rebuild the bundle from
the reviewed source and get the hash the coordinator's ``flwr run`` will submit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedmed.errors import PolicyError, RequestRefused
from fedmed.policy import ReasonCode, SitePolicy, fab_hash_of

__all__ = [
    "APP_NOT_APPROVED",
    "check_bundle",
    "fab_hash",
]

APP_NOT_APPROVED = ReasonCode.APP_NOT_APPROVED.value
"""The reason of a refused bundle's error reply: all the coordinator learns about it."""


def fab_hash(source: str | Path | bytes) -> str:
    """The SHA-256 (lower-case hex) that Flower reports for an app bundle.

    Args:
        source: The bundle's bytes; an app directory (hashed as the bundle ``flwr run DIR``
            would submit, built with Flower's own ``build_fab_from_disk``); a ``.fab`` file
            (``flwr build`` writes one) or a hash (both as :func:`fedmed.policy.fab_hash_of`).

    Returns:
        64 lower-case hex digits.

    Raises:
        PolicyError: ``source`` is none of these; the message says what was expected.
    """
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    path = Path(source).expanduser()
    if not path.is_dir():
        return fab_hash_of(source)
    from flwr.cli.build import build_fab_from_disk

    try:
        return hashlib.sha256(build_fab_from_disk(path)).hexdigest()
    except (ValueError, OSError) as exc:
        raise PolicyError(
            f"app directory {path}: Flower cannot build a bundle from it ({exc}); point at "
            "the folder that holds the app's pyproject.toml"
        ) from None


def check_bundle(content: bytes, claimed_hash: str, policy: SitePolicy) -> str:
    """Refuse a bundle unless its bytes hash to an approved, truthfully claimed hash.

    Flower's SuperNode stores a bundle under the hash the SuperLink claims for it and loads
    the app from a folder named after that claim, without comparing it with the bytes; so
    both must agree, and the bytes' hash must be approved.

    Args:
        content: The bundle's bytes, exactly as they would be unpacked.
        claimed_hash: The hash the coordinator's SuperLink announced for it.
        policy: The site policy (read afresh for every task, so approvals and
            withdrawals apply to the next round without a restart).

    Returns:
        The bundle's hash.

    Raises:
        RequestRefused: Code :data:`APP_NOT_APPROVED`; the detail (hashes) is for the
            site's own log.
    """
    digest = hashlib.sha256(content).hexdigest()
    if claimed_hash.lower() != digest:
        raise RequestRefused(
            APP_NOT_APPROVED,
            f"the bundle's bytes hash to {digest} but the SuperLink announced "
            f"{claimed_hash!r} for them",
        )
    if not policy.is_approved(digest):
        raise RequestRefused(
            APP_NOT_APPROVED,
            f"app bundle {digest} is not approved in the site policy; review it and run "
            f"`fedmed site approve {digest} --policy POLICY` to allow it",
        )
    return digest
