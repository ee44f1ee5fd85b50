"""Debian tools the tests need (nginx, dicom3tools): found, or installed with apt.

CI runs on a clean Debian/Ubuntu box as root, so a test installs its tool itself (one
``apt-get install``, ~20 s) instead of asking ``.ci/run`` to. Installing must not leave a
service running (nginx on port 80): a temporary ``policy-rc.d`` (Debian's switch for "do not
start services while installing") is put in place for the install when none exists, and
``RUNLEVEL=1`` covers sysv-style starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["NginxUnavailable", "ToolUnavailable", "ensure_nginx", "ensure_tool"]

_POLICY_RC = Path("/usr/sbin/policy-rc.d")
_NGINX = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


class ToolUnavailable(RuntimeError):
    """A tool is missing and cannot be installed here; the message says why."""


NginxUnavailable = ToolUnavailable


def _find(binary: str, candidates: tuple[str, ...]) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def ensure_nginx(timeout: float = 600.0) -> str:
    """Path of an nginx binary (see :func:`ensure_tool`)."""
    return ensure_tool("nginx", "nginx", _NGINX, timeout=timeout)


def ensure_tool(
    binary: str, package: str, candidates: tuple[str, ...] = (), *, timeout: float = 600.0
) -> str:
    """Path of ``binary``, installing the distribution's ``package`` if it is missing.

    Raises:
        ToolUnavailable: Not installed, and not root or no ``apt-get``, or the install
            failed (its output tail is in the message).
    """
    found = _find(binary, candidates)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolUnavailable(
            f"{binary} is not installed and this is not a root shell with apt-get; install "
            f"the distribution's package (apt-get install {package})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    created = not _POLICY_RC.exists()
    try:
        if created:
            _POLICY_RC.write_text("#!/bin/sh\n# fedmed tests: no service starts\nexit 101\n")
            _POLICY_RC.chmod(0o755)
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        ):
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-800:]
                raise ToolUnavailable(f"`{' '.join(argv)}` failed ({done.returncode}):\n{tail}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolUnavailable(f"installing {package} failed: {exc}") from None
    finally:
        if created:
            _POLICY_RC.unlink(missing_ok=True)
    found = _find(binary, candidates)
    if found is None:
        raise ToolUnavailable(f"apt-get installed {package} but no {binary} binary was found")
    return found
