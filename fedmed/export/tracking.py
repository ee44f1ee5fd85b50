"""Run tracking: every metrics line of a run, live, in TensorBoard and MLflow.

A run directory's ``metrics.jsonl`` stays the record; a :class:`RunTracker` sends the same
lines to the tools FL operators watch:

- TensorBoard event files in ``RUN/tb/`` (``torch.utils.tensorboard.SummaryWriter``, which
  needs the ``tensorboard`` package), so ``tensorboard --logdir runs/`` shows every run of a
  folder side by side (``fedmed compare``: one run folder per approach);
- an MLflow run (``MlflowClient``): by default in a local SQLite store,
  ``RUN/mlruns/mlflow.db`` (no server; MLflow 3 keeps its ``./mlruns`` file store in
  maintenance mode and refuses it by default), or at ``tracking.mlflow_uri`` (a tracking
  server ``http(s)://...`` or any store URI MLflow takes).

What is logged is whatever a metrics line holds, by step (``round`` for federated runs,
``epoch`` for the baselines): every finite number, nested mappings flattened with ``/``
(``central_dice``, ``central_dice_per_class/CSF``, ``per_site_dice/hospital-a``,
``epsilon/hospital-a``, ``train_loss``, ``bytes_sent``, ``round_seconds``; ``loss``,
``lr``, ``seconds`` per epoch), then the run's final figures under ``final/``. MLflow
also gets the resolved config as parameters, TensorBoard as text.

Both packages are optional (``pip install 'fedmed[tracking]'``): a missing one costs a
one-line note, never the run. A writer that fails while the run goes on (a tracking server
that goes away, a full disk) is dropped with a one-line warning: tracking never stops a
federation.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fedmed.config import FederationConfig
from fedmed.errors import ConfigError

log = logging.getLogger(__name__)

TB_DIR = "tb"
"""``RUN/tb/``: TensorBoard event files."""
MLFLOW_DIR = "mlruns"
"""``RUN/mlruns/``: the default MLflow store (``mlflow.db``) and its artifacts."""
MLFLOW_RUN_ID_FILE = "mlflow-run-id"
"""``RUN/mlflow-run-id``: the MLflow run that ``--resume`` continues."""
INSTALL_HINT = "pip install 'fedmed[tracking]'"
BACKENDS = ("tensorboard", "mlflow", "none")
"""What ``--tracking`` takes (comma-separated)."""
STEP_KEYS = ("round", "epoch")
"""Keys of a metrics line that are its step, not a metric."""
SUMMARY_FIELDS = ("dice_mean", "dice_per_class", "hd95_mean", "per_site", "unseen",
                  "epsilon", "wall_seconds")
"""``summary.json`` fields logged under ``final/``."""
_MLFLOW_BATCH = 100  # MLflow's log_batch limit for params (metrics: 1000)
_MLFLOW_PARAM_CHARS = 500  # the smallest param value limit of the MLflow versions we take
_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")

Note = Callable[[str], None]


def scalars(line: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics line by tag.

    Nested mappings are flattened with ``/`` (``{"epsilon": {"a": 1.2}}`` ->
    ``epsilon/a``); strings, booleans, lists, ``None`` and non-finite numbers are left
    out, and so are the step keys (:data:`STEP_KEYS`) at the top level.

    Args:
        line: a metrics line (or a summary).
        prefix: put before every tag (``final/``).
    """
    out: dict[str, float] = {}
    for key, value in line.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            continue
        elif math.isfinite(value) and not (not prefix and key in STEP_KEYS):
            out[tag] = float(value)
    return out


class Writer(Protocol):
    """One tracking backend."""

    name: str

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` (tag -> number) at ``step``."""

    def close(self, ok: bool) -> None:
        """Flush and close; ``ok``: the run finished (else it failed)."""


class TensorBoardWriter:
    """Scalars into TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``).

    Args:
        folder: ``RUN/tb``.
        start_step: the first step this process logs; on a resumed run (> 1) events of
            later steps that a crash left behind are purged (``purge_step``).
        config_text: the resolved config, shown under TensorBoard's Text tab.

    Raises:
        ImportError: the ``tensorboard`` package is not installed.
    """

    name = "TensorBoard"

    def __init__(self, folder: Path, *, start_step: int = 1, config_text: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(
            str(folder), purge_step=start_step if start_step > 1 else None
        )
        if config_text is not None:
            # Markdown: indented, so YAML shows verbatim.
            self._writer.add_text("config", "    " + config_text.replace("\n", "\n    "))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` at ``step`` and flush (a live view, not every 2 minutes)."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self, ok: bool) -> None:
        """Close the event file."""
        self._writer.close()


def mlflow_key(tag: str) -> str:
    """``tag`` with characters MLflow refuses in metric names replaced by ``_``."""
    return _MLFLOW_BAD_CHARS.sub("_", tag)


def default_mlflow_uri(folder: Path) -> str:
    """The local MLflow store in ``folder``: ``sqlite:///<folder>/mlflow.db`` (absolute)."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts next to a local SQLite store (else the store's own default)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "artifacts")
    return None


def config_params(cfg: FederationConfig) -> dict[str, str]:
    """The resolved config as flat MLflow parameters (``training.learning_rate`` -> ``"0.003"``)."""

    def flat(data: Mapping[str, Any], prefix: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in data.items():
            name = mlflow_key(f"{prefix}{key}")
            if isinstance(value, Mapping) and value:
                out.update(flat(value, f"{name}."))
            else:
                text = value if isinstance(value, str) else json.dumps(value)
                out[name] = text[:_MLFLOW_PARAM_CHARS]
        return out

    return flat(cfg.model_dump(mode="json"), "")


class MlflowWriter:
    """Metrics into one MLflow run (``MlflowClient``: no global MLflow state is touched).

    Build it with :meth:`open`.

    Args:
        client: an ``mlflow.tracking.MlflowClient``.
        run_id: the run to log into.
    """

    name = "MLflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self.run_id = run_id

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        experiment: str,
        run_name: str,
        run_id_file: Path,
        resume: bool,
        tags: Mapping[str, str],
        params: Mapping[str, str],
    ) -> MlflowWriter:
        """Start an MLflow run (or, on ``resume``, continue the one in ``run_id_file``).

        Args:
            uri: the tracking URI (store or server).
            experiment: the experiment's name; created when missing.
            run_name: the run's name in the MLflow UI.
            run_id_file: where the run id is kept for ``--resume``.
            resume: continue the recorded run instead of starting one.
            tags: run tags.
            params: run parameters (a new run only: MLflow refuses changed values).

        Raises:
            ImportError: MLflow is not installed.
            Exception: whatever MLflow raises for an unusable URI or store.
        """
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if resume and run_id_file.is_file():
            run_id = run_id_file.read_text().strip()
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id)
        found = client.get_experiment_by_name(experiment)
        exp_id = (found.experiment_id if found is not None else
                  client.create_experiment(experiment, artifact_location=_artifact_location(uri)))
        run = client.create_run(exp_id, run_name=run_name, tags=dict(tags))
        run_id_file.write_text(run.info.run_id + "\n")
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            client.log_batch(run.info.run_id, params=items[i:i + _MLFLOW_BATCH])
        return cls(client, run.info.run_id)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``values`` at ``step`` in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 10 * _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + 10 * _MLFLOW_BATCH])

    def close(self, ok: bool) -> None:
        """Mark the run ``FINISHED`` (or ``FAILED``)."""
        self._client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class RunTracker:
    """Sends a run's metrics lines to its writers; without writers it does nothing.

    Use it as a context manager, or call :meth:`close` at the end. A writer that raises is
    dropped with a one-line warning; the run goes on.

    Args:
        writers: the open backends.
        note: where warnings go (default: this module's logger).
    """

    def __init__(self, writers: Sequence[Writer] = (), note: Note | None = None) -> None:
        self.writers = list(writers)
        self.note: Note = note or log.warning

    @property
    def backends(self) -> list[str]:
        """Names of the writers still logging (``TensorBoard``, ``MLflow``)."""
        return [w.name for w in self.writers]

    def _each(self, action: Callable[[Writer], None]) -> None:
        for writer in list(self.writers):
            try:
                action(writer)
            except Exception as exc:  # tracking must never stop a run
                self.writers.remove(writer)
                self.note(f"run tracking: {writer.name} stopped logging ({_one_line(exc)}); "
                          "the run goes on without it")

    def log_line(self, line: Mapping[str, Any], step: int) -> None:
        """Log one metrics line (a round's or an epoch's) at ``step``."""
        values = scalars(line)
        if values:
            self._each(lambda w: w.scalars(values, step))

    def log_summary(self, summary: Mapping[str, Any], step: int) -> None:
        """Log the final figures of ``summary.json`` (:data:`SUMMARY_FIELDS`) under ``final/``."""
        values = scalars({k: summary[k] for k in SUMMARY_FIELDS if k in summary}, "final/")
        if values:
            self._each(lambda w: w.scalars(values, step))

    def finish(self, summary: Mapping[str, Any], step: int) -> None:
        """:meth:`log_summary`, then :meth:`close` (the run finished)."""
        self.log_summary(summary, step)
        self.close()

    def close(self, ok: bool = True) -> None:
        """Close every writer (``ok``: the run finished); the tracker logs nothing after."""
        self._each(lambda w: w.close(ok))
        self.writers = []

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(ok=kind is None)


def open_tracker(
    cfg: FederationConfig,
    run_path: Path,
    *,
    mode: str,
    start_step: int = 1,
    note: Note | None = None,
) -> RunTracker:
    """The tracker that ``cfg.tracking`` asks for, for the run in ``run_path``.

    Args:
        cfg: the run's config (its ``tracking`` section; the rest is logged as parameters).
        run_path: the run directory (``RUN/tb``, ``RUN/mlruns``, ``RUN/mlflow-run-id``).
        mode: ``federated``, ``centralized`` or ``local`` (an MLflow tag).
        start_step: the first step this process logs (> 1: a resumed run).
        note: where notes go (default: this module's logger, at warning level).

    Returns:
        A tracker with the backends that could be opened (possibly none: a no-op).
    """
    say: Note = note or log.warning
    t = cfg.tracking
    resume = start_step > 1
    config_text = None if resume else _config_yaml(cfg)
    writers: list[Writer] = []
    if t.tensorboard:
        try:
            writers.append(TensorBoardWriter(run_path / TB_DIR, start_step=start_step,
                                             config_text=config_text))
        except ImportError:
            say(f"run tracking: TensorBoard is not installed, so no event files go to "
                f"{run_path / TB_DIR} ({INSTALL_HINT})")
    if t.mlflow:
        uri = t.mlflow_uri or default_mlflow_uri(run_path / MLFLOW_DIR)
        if t.mlflow_uri is None:
            (run_path / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
        try:
            writers.append(MlflowWriter.open(
                uri, experiment=t.mlflow_experiment or cfg.name, run_name=run_path.name,
                run_id_file=run_path / MLFLOW_RUN_ID_FILE, resume=resume,
                tags={"fedmed.mode": mode, "fedmed.run_dir": str(run_path.resolve())},
                params={} if resume else config_params(cfg),
            ))
        except ImportError:
            say(f"run tracking: MLflow is not installed, so nothing goes to {uri} "
                f"({INSTALL_HINT})")
        except Exception as exc:  # an unusable store or server must not stop the run
            say(f"run tracking: MLflow at {uri} refused the run ({_one_line(exc)}); the run "
                "goes on without it")
    return RunTracker(writers, say)


def with_tracking(
    cfg: FederationConfig, backends: Sequence[str] | None = None, mlflow_uri: str | None = None
) -> FederationConfig:
    """``cfg`` with the command line's tracking choices applied.

    Args:
        cfg: the config.
        backends: ``tensorboard`` and/or ``mlflow`` to turn on (added to the config's),
            or ``none`` to turn both off; ``None``: the config's choice.
        mlflow_uri: the MLflow tracking URI (turns MLflow on).

    Raises:
        ConfigError: an unknown backend, or ``none`` together with a backend or a URI.
    """
    changes: dict[str, Any] = {}
    chosen = set(backends or ())
    unknown = chosen - set(BACKENDS)
    if unknown:
        raise ConfigError(f"--tracking {', '.join(sorted(unknown))}: unknown; choose from "
                          f"{', '.join(BACKENDS)} (comma-separated)")
    if "none" in chosen and (len(chosen) > 1 or mlflow_uri is not None):
        raise ConfigError("--tracking none turns tracking off; it cannot be combined with "
                          "another backend or --mlflow-uri")
    if "none" in chosen:
        changes.update(tensorboard=False, mlflow=False)
    if "tensorboard" in chosen:
        changes["tensorboard"] = True
    if "mlflow" in chosen or mlflow_uri is not None:
        changes["mlflow"] = True
    if mlflow_uri is not None:
        changes["mlflow_uri"] = mlflow_uri
    return cfg.with_changes(tracking=changes) if changes else cfg


def shared_mlflow_store(cfg: FederationConfig, folder: Path) -> FederationConfig:
    """``cfg`` with one MLflow store in ``folder/mlruns`` for several runs (``fedmed compare``).

    Unchanged when MLflow is off or a URI is set.
    """
    t = cfg.tracking
    if not t.mlflow or t.mlflow_uri is not None:
        return cfg
    (folder / MLFLOW_DIR).mkdir(parents=True, exist_ok=True)
    return cfg.with_changes(tracking={"mlflow_uri": default_mlflow_uri(folder / MLFLOW_DIR)})


def _config_yaml(cfg: FederationConfig) -> str:
    import yaml

    return str(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


__all__ = [
    "BACKENDS",
    "INSTALL_HINT",
    "MLFLOW_DIR",
    "MLFLOW_RUN_ID_FILE",
    "TB_DIR",
    "MlflowWriter",
    "RunTracker",
    "TensorBoardWriter",
    "Writer",
    "default_mlflow_uri",
    "open_tracker",
    "scalars",
    "shared_mlflow_store",
    "with_tracking",
]
