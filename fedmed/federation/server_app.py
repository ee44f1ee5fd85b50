"""The fedmed ``ServerApp``: run config in, coordinator, run directory out.

``server/app.py`` exposes :func:`make_server_app`'s app. Run-config keys
(``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``--run-config``):
``fedmed-config`` (the federation YAML), ``run-dir``, ``resume``, and the overrides
``strategy`` / ``rounds`` (empty / 0: the config's). Secure aggregation picks the SecAgg+
coordinator; everything else is the plain :class:`~fedmed.federation.coordinator.Coordinator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmed.config import FederationConfig, dump_config, load_config
from fedmed.errors import FederationError
from fedmed.federation.coordinator import Coordinator, RoundCallback
from fedmed.federation.protocol import CFG_KEY
from fedmed.federation.rundir import RunDir

DEFAULT_RUN_DIR = "runs/flwr-run"
RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"


def resolve_app_path(path: str) -> Path:
    """A run-config path: absolute, existing, or relative to the app (pyproject.toml) folder."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    app_root = Path(__file__).resolve().parents[2]  # the folder holding pyproject.toml
    return app_root / p


def _run_config_flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def apply_overrides(
    cfg: FederationConfig, *, strategy: str | None = None, rounds: int | None = None
) -> FederationConfig:
    """``cfg`` with ``--strategy`` / ``--rounds`` applied."""
    changes: dict[str, Any] = {}
    if strategy:
        changes["strategy"] = strategy.lower()
    if rounds:
        changes["rounds"] = int(rounds)
    return cfg.with_changes(federation=changes) if changes else cfg


def _run_from_config(
    run_config: Mapping[str, Any], resume: bool, cfg: FederationConfig | None
) -> tuple[FederationConfig, RunDir]:
    if cfg is None:
        path = run_config.get(CFG_KEY)
        if not path:
            raise FederationError(
                f"the run config has no {CFG_KEY!r}: set it in [tool.flwr.app.config] of "
                "pyproject.toml or pass --run-config \"fedmed-config='fed.yaml'\""
            )
        cfg = load_config(resolve_app_path(str(path)))
    cfg = apply_overrides(
        cfg,
        strategy=str(run_config.get("strategy") or "") or None,
        rounds=int(run_config.get("rounds") or 0) or None,
    )
    target = resolve_app_path(str(run_config.get(RUN_DIR_KEY) or DEFAULT_RUN_DIR))
    run = RunDir.create(target, cfg, resume=resume)
    if resume:
        dump_config(cfg, run.path / "config.yaml")
    return cfg, run


def serve(
    grid: Any,
    run_config: Mapping[str, Any],
    *,
    cfg: FederationConfig | None = None,
    run_dir: Path | None = None,
    resume: bool | None = None,
    on_round: RoundCallback | None = None,
) -> dict[str, Any]:
    """The ServerApp's work: config -> coordinator -> rounds -> run directory.

    Args:
        grid: Flower's Grid.
        run_config: Flower's run config (``fedmed-config``, ``run-dir``, ``resume``,
            ``strategy``, ``rounds``).
        cfg: the config (simulation binds it); default: read from ``fedmed-config``.
        run_dir: an already created run directory (simulation); else ``run-dir`` is
            created here from the run config.
        resume: overrides the run config's ``resume``.
        on_round: progress callback.

    Raises:
        FedMedError: bad config, run directory in use, resume mismatch.
    """
    do_resume = _run_config_flag(run_config.get(RESUME_KEY, False)) if resume is None else resume
    if run_dir is None:
        cfg, run = _run_from_config(run_config, do_resume, cfg)
    elif cfg is None:
        raise FederationError("serve: run_dir given without its config")
    else:
        run = RunDir(run_dir)
    if cfg.secure_aggregation.enabled:
        # SecAgg+ lives on Flower's legacy path; same run directory, metrics and summary.
        from fedmed.federation.secagg_coordinator import SecAggCoordinator

        coordinator: Coordinator = SecAggCoordinator(
            cfg, run, resume=do_resume, on_round=on_round, run_config=run_config
        )
    else:
        coordinator = Coordinator(cfg, run, resume=do_resume, on_round=on_round)
    return coordinator.run_rounds(grid)


def make_server_app(
    *,
    cfg: FederationConfig | None = None,
    run_dir: Path | None = None,
    resume: bool | None = None,
    on_round: RoundCallback | None = None,
) -> Any:
    """The fedmed ``ServerApp`` (``server/app.py`` uses the defaults: all from run config).

    Args:
        cfg: bind a config (simulation); default: the run config's ``fedmed-config``.
        run_dir: bind an already created run directory (simulation).
        resume: bind ``--resume``; default: the run config's ``resume``.
        on_round: progress callback (simulation, in-process).
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Any, context: Any) -> None:
        serve(grid, context.run_config, cfg=cfg, run_dir=run_dir, resume=resume,
              on_round=on_round)

    return app


__all__ = ["apply_overrides", "make_server_app", "serve"]
