"""The distribution's nginx for the proxy tests: found, or installed with apt when possible.

CI runs on a clean Debian/Ubuntu box as root, so the test installs ``nginx`` itself (one
``apt-get install``, ~20 s) instead of asking ``.ci/run`` to. Installing must not leave a
system nginx running on port 80: a temporary ``policy-rc.d`` (Debian's switch for "do not
start services while installing") is put in place for the install when none exists, and
``RUNLEVEL=1`` covers sysv-style starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

__all__ = ["NginxUnavailable", "ensure_nginx"]

_POLICY_RC = Path("/usr/sbin/policy-rc.d")
_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


class NginxUnavailable(RuntimeError):
    """nginx is missing and cannot be installed here; the message says why."""


def _find() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((c for c in _CANDIDATES if os.access(c, os.X_OK)), None)


def ensure_nginx(timeout: float = 600.0) -> str:
    """Path of an nginx binary, installing the distribution's package if it is missing.

    Raises:
        NginxUnavailable: Not installed, and not root or no ``apt-get``, or the install
            failed (its output tail is in the message).
    """
    found = _find()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise NginxUnavailable(
            "nginx is not installed and this is not a root shell with apt-get; install the "
            "distribution's package (apt-get install nginx) to run the proxy tests"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    created = not _POLICY_RC.exists()
    try:
        if created:
            _POLICY_RC.write_text("#!/bin/sh\n# fedmed tests: no service starts\nexit 101\n")
            _POLICY_RC.chmod(0o755)
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"],
        ):
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-800:]
                raise NginxUnavailable(f"`{' '.join(argv)}` failed ({done.returncode}):\n{tail}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NginxUnavailable(f"installing nginx failed: {exc}") from None
    finally:
        if created:
            _POLICY_RC.unlink(missing_ok=True)
    found = _find()
    if found is None:
        raise NginxUnavailable("apt-get installed nginx but no nginx binary was found")
    return found
