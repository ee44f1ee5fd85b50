"""The whole federation on one machine: Flower's simulation engine (Ray backend).

:func:`run_federated` is what ``fedmed simulate`` and ``fedmed compare`` call. It runs the
same ServerApp and ClientApp as a deployment (``server/app.py``, ``client/app.py``), with
the config and run directory bound in and one virtual SuperNode per site
(``partition-id`` -> ``cfg.sites[i]``). Each simulated site takes its folders and policy
from the researcher's config, never from the coordinator's messages, and keeps its state
(fixed split, lifetime privacy ledger, per-run state) in its state folder across runs,
as a hospital would (``sites[].state_dir``, default ``<site>/.fedmed-state``).

Ray is started with only the resources the sites need (``federation.client_resources``
times the number of sites trained at once), quietly (no dashboard, worker logs not
forwarded, Flower's per-round INFO logs off), and shut down when the run ends.

With ``ray_address`` the run attaches to an existing Ray cluster instead (``ray start
--head`` on one machine, ``ray start --address=HEAD:PORT`` on the others; see
``docs/scaling.md``): the cluster's own CPUs and GPUs then decide how many sites train at
once, and only this driver's connection is closed at the end (the cluster keeps running).

Memory stays bounded in the number of sites: a site's cases and model are built inside
its ClientApp call and released when it returns, and Flower keeps one actor per worker
slot, so peak memory grows with the pool size, not with the federation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmed.config import FederationConfig, dump_config
from fedmed.errors import ConfigError
from fedmed.federation.client_app import make_client_app
from fedmed.federation.coordinator import RoundCallback
from fedmed.federation.rundir import RunDir
from fedmed.federation.server_app import apply_overrides, make_server_app
from fedmed.federation.site import simulated_sites

log = logging.getLogger(__name__)


def parallel_sites(cfg: FederationConfig, cpu_count: int | None = None) -> int:
    """How many sites train at once.

    ``max_parallel_sites``, else as many as the cores allow; never more than there are sites.
    """
    fed = cfg.federation
    if fed.max_parallel_sites is not None:
        n = fed.max_parallel_sites
    else:
        cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
        n = max(1, int(cores // max(fed.client_resources.num_cpus, 1e-9)))
    return max(1, min(n, len(cfg.sites)))


def backend_config(
    cfg: FederationConfig, cpu_count: int | None = None, *, ray_address: str | None = None
) -> dict[str, Any]:
    """Flower's simulation backend config: client resources and a bounded, quiet Ray.

    Args:
        cfg: the federation config (``federation.client_resources``, ``max_parallel_sites``).
        cpu_count: cores of this machine (default: ``os.cpu_count()``).
        ray_address: attach to this running Ray cluster (``HOST:PORT`` of ``ray start
            --head``, or ``auto``) instead of starting a private one; Ray refuses CPU and
            GPU counts when attaching, so the cluster's own resources apply.
    """
    res = cfg.federation.client_resources
    client_resources = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if ray_address is not None:
        return {
            "client_resources": client_resources,
            "init_args": {
                "address": ray_address, "logging_level": "ERROR", "log_to_driver": False,
            },
        }
    parallel = parallel_sites(cfg, cpu_count)
    init_args: dict[str, Any] = {
        "num_cpus": max(1, math.ceil(parallel * res.num_cpus)),
        "include_dashboard": False,
        "logging_level": "ERROR",
        "log_to_driver": False,
    }
    if res.num_gpus > 0:
        import torch

        init_args["num_gpus"] = torch.cuda.device_count()
    else:
        init_args["num_gpus"] = 0
    return {"client_resources": client_resources, "init_args": init_args}


def check_simulation_config(cfg: FederationConfig) -> None:
    """Reject settings with which a simulation could never start a round.

    Raises:
        ConfigError: no sites, or minimum site numbers above the number of sites (Flower
            would wait for nodes that never connect).
    """
    n = len(cfg.sites)
    fed = cfg.federation
    if n == 0:
        raise ConfigError("the federation config names no sites; add at least one under sites:")
    for key in ("min_available_sites", "min_train_sites"):
        value = getattr(fed, key)
        if value > n:
            raise ConfigError(
                f"federation.{key} is {value} but the config has only {n} sites "
                f"{cfg.site_names}; lower it to at most {n}"
            )


def run_federated(
    cfg: FederationConfig,
    out: str | Path,
    *,
    strategy: str | None = None,
    rounds: int | None = None,
    resume: bool = False,
    force: bool = False,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the federation in simulation and return its summary.

    Args:
        cfg: the federation config.
        out: the run directory.
        strategy: overrides ``federation.strategy``.
        rounds: overrides ``federation.rounds`` (on ``resume``: rounds in total).
        resume: continue the run in ``out`` after its last finished round.
        force: replace what ``out`` holds.
        on_round: called with each round's metrics line.
        verbose: keep Flower's INFO logging.
        ray_address: attach to a running Ray cluster (``HOST:PORT``) instead of starting
            one on this machine; every node of the cluster must reach the data paths of
            the config and the run directory ``out`` (shared file system).

    Returns:
        ``summary.json`` as a dict.

    Raises:
        FedMedError: invalid config, ``out`` in use, an unreachable Ray address, or a
            failure of the run.
    """
    cfg = apply_overrides(cfg, strategy=strategy, rounds=rounds)
    check_simulation_config(cfg)
    if ray_address is not None:
        ray_address = check_ray_address(ray_address)
    run = RunDir.create(out, cfg, resume=resume, force=force)
    if resume:
        dump_config(cfg, run.path / "config.yaml")
    server_app = make_server_app(cfg=cfg, run_dir=run.path, resume=resume, on_round=on_round)
    client_app = make_client_app(sites=simulated_sites(cfg))
    backend = backend_config(cfg, ray_address=ray_address)
    _simulate(server_app, client_app, len(cfg.sites), backend, verbose=verbose)
    return run.read_summary()


def check_ray_address(address: str) -> str:
    """``address`` stripped, if it names a reachable Ray cluster.

    ``auto`` (the cluster ``ray start`` on this machine recorded) is passed through; a
    ``HOST:PORT`` (or ``ray://HOST:PORT``, Ray Client) is checked with a TCP connection, so
    a typo fails at once with a clear message instead of after Ray's own long retries.

    Raises:
        ConfigError: empty, not ``HOST:PORT``, or nothing listening there.
    """
    import socket

    addr = address.strip()
    if addr == "auto":
        return addr
    host, sep, port = addr.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"--ray-address {address!r} is not HOST:PORT; give the address that "
            "'ray start --head --port=PORT' printed, e.g. 10.0.0.5:6379 (or 'auto')"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {addr}: no Ray head answers there ({exc}); start one with "
            f"'ray start --head --port={port}' or check the host and port"
        ) from None
    return addr


def _simulate(
    server_app: Any, client_app: Any, num_sites: int, backend: Mapping[str, Any], *,
    verbose: bool,
) -> None:
    import warnings

    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # Ray's notice about accelerator env vars when num_gpus=0: not actionable here.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\..*")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_sites,
                backend_config=dict(backend),  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(level)
        _shutdown_ray()


def _shutdown_ray() -> None:
    # Flower's Ray backend shuts Ray down when the run ends normally; this covers the
    # paths where the ServerApp failed before the backend was torn down.
    try:
        import ray
    except ImportError:  # pragma: no cover - ray comes with flwr[simulation]
        return
    if ray.is_initialized():
        ray.shutdown()


__all__ = [
    "backend_config",
    "check_ray_address",
    "check_simulation_config",
    "parallel_sites",
    "run_federated",
]
