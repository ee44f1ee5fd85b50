"""The run directory: what every mode (centralized, local, federated) leaves behind.

Layout (DESIGN.md)::

    RUN/config.yaml      the resolved federation config
    RUN/metrics.jsonl    one JSON object per epoch (centralized/local) or round (federated)
    RUN/summary.json     mode, dice_mean, dice_per_class, hd95_mean, per_site, wall_seconds, ...
    RUN/model.pt         weights + model config + preprocessing settings (``fedmed predict``)
    RUN/logs/            text logs
    RUN/run-id           the run's name towards the sites (folder name + random suffix)
    RUN/tb/              TensorBoard event files (when tensorboard is installed)
    RUN/mlruns/, RUN/mlflow-run-id   MLflow store and run id (with --tracking mlflow)

No Flower import here: the centralized baseline writes run directories too.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmed.config import FederationConfig, dump_config
from fedmed.errors import FederationError

SUMMARY_KEYS = ("mode", "dice_mean", "dice_per_class", "hd95_mean", "per_site", "wall_seconds")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


class RunDir:
    """A run directory on disk.

    Args:
        path: the folder (need not exist until :meth:`create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(
        cls, path: str | Path, cfg: FederationConfig, *, resume: bool = False, force: bool = False
    ) -> RunDir:
        """Make the folder and write ``config.yaml``.

        Args:
            path: the run folder.
            cfg: the resolved config written to ``config.yaml``.
            resume: keep what is there (``--resume``); the folder must hold a run.
            force: replace a non-empty folder.

        Raises:
            FederationError: the folder holds another run and neither ``resume`` nor
                ``force`` was given, or ``resume`` was given and there is nothing to resume.
        """
        run = cls(path)
        exists = run.path.exists() and any(run.path.iterdir())
        if resume:
            if not (run.path / "config.yaml").is_file():
                raise FederationError(f"--resume: {run.path} holds no run (no config.yaml)")
        elif exists:
            if not force:
                raise FederationError(
                    f"{run.path} already holds files; choose another --out, pass --resume to "
                    "continue that run, or --force to replace it"
                )
            shutil.rmtree(run.path)
        (run.path / "logs").mkdir(parents=True, exist_ok=True)
        if not resume:
            dump_config(cfg, run.path / "config.yaml")
        if not resume or not run.run_id_path.is_file():
            run.run_id_path.write_text(f"{run.path.name}-{secrets.token_hex(6)}\n")
        return run

    @property
    def run_id_path(self) -> Path:
        """``run-id``: the run's name towards the sites."""
        return self.path / "run-id"

    @property
    def run_id(self) -> str:
        """The run's name towards the sites (kept on ``--resume``).

        The folder's name plus a random suffix, so two runs in folders of the same name
        never share a site's per-run state.
        """
        if self.run_id_path.is_file():
            return self.run_id_path.read_text().strip()
        return self.path.name

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``."""
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        """``summary.json``."""
        return self.path / "summary.json"

    @property
    def model_path(self) -> Path:
        """``model.pt``."""
        return self.path / "model.pt"

    @property
    def logs(self) -> Path:
        """``logs/``."""
        return self.path / "logs"

    def append_metrics(self, line: Mapping[str, Any]) -> None:
        """Append one JSON object to ``metrics.jsonl``."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_jsonable(line)) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl``."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(s) for s in self.metrics_path.read_text().splitlines() if s.strip()]

    def write_summary(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``summary.json``.

        Raises:
            FederationError: a contract key (DESIGN.md) is missing.
        """
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise FederationError(f"summary.json would lack {missing}")
        data = _jsonable(dict(summary))
        self.summary_path.write_text(json.dumps(data, indent=2) + "\n")
        return data

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` as a dict.

        Raises:
            FederationError: there is none yet.
        """
        if not self.summary_path.is_file():
            raise FederationError(f"{self.summary_path} does not exist: the run did not finish")
        return json.loads(self.summary_path.read_text())
