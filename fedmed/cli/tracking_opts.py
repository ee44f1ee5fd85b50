"""``--tracking`` and ``--mlflow-uri``, shared by the training commands."""

from __future__ import annotations

import typer

from fedmed.config import FederationConfig

TrackingOpt = typer.Option(
    None, "--tracking",
    help="Run tracking, comma-separated: tensorboard (RUN/tb, on by default), mlflow (adds "
    "MLflow), none (off). Default: the config's tracking section. Needs fedmed[tracking].",
)
MlflowUriOpt = typer.Option(
    None, "--mlflow-uri",
    help="MLflow tracking URI (a server http://host:5000 or sqlite:////abs/mlflow.db); "
    "turns MLflow on. Default: RUN/mlruns/mlflow.db, no server.",
)


def apply_tracking(
    cfg: FederationConfig, tracking: str | None, mlflow_uri: str | None
) -> FederationConfig:
    """``cfg`` with ``--tracking`` / ``--mlflow-uri`` applied (see ``with_tracking``).

    Raises:
        ConfigError: an unknown backend, or ``none`` combined with another choice.
    """
    from fedmed.export.tracking import with_tracking

    names = None if tracking is None else [
        s.strip().lower() for s in tracking.split(",") if s.strip()
    ]
    return with_tracking(cfg, names, mlflow_uri)
