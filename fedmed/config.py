"""The federation config (YAML) as validated, frozen models.

A federation config is parsed once, by :func:`load_config`, into :class:`FederationConfig`;
everything else receives the model (or one of its sections), never raw dictionaries.
Relative paths in the YAML are resolved against the YAML file's folder.

Example (``fedmed data synth`` writes a complete one)::

    name: demo
    modalities: [T1, T2, FLAIR]
    labels: {0: background, 1: CSF, 2: GM, 3: WM, 4: lesion}
    sites:
      - {name: hospital-a, path: hospital-a}
      - {name: hospital-b, path: hospital-b}
    central_test: central-test
    unseen_sites: [unseen-scanner]
    preprocessing: {target_spacing: [2.2, 2.2, 2.2], patch_size: [64, 64, 64]}
    model: {architecture: unet, channels: [16, 32, 64, 128]}
    training: {epochs: 20, batch_size: 2}
    federation: {strategy: fedavg, rounds: 10, local_epochs: 2}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmed.errors import ConfigError

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]
PositiveInt = Annotated[int, Field(gt=0)]
STATE_DIR_NAME = ".fedmed-state"
"""A simulated site's default state folder, inside its data folder."""
PositiveFloat = Annotated[float, Field(gt=0)]
StrategyName = Literal[
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "fedbn"
]
Architecture = Literal["unet", "fusion"]


class _Frozen(BaseModel):
    """Base: immutable, unknown keys rejected (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class SiteConfig(_Frozen):
    """One hospital's data as the federation config names it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path
    privacy: PrivacySiteOverride | None = None
    """Per-site DP overrides (e.g. a stricter ``max_epsilon``)."""
    policy: Path | None = None
    """Simulation: the site policy this simulated site enforces (``site-policy.yaml``);
    ``None``: a policy that permits this config's own settings."""
    state_dir: Path | None = None
    """Simulation: the site's state folder (split, privacy ledger, per-run state), kept
    across runs like a hospital's; default ``<path>/.fedmed-state``."""


class NormalizationConfig(_Frozen):
    """Intensity normalisation of one modality."""

    kind: Literal["zscore", "ct_window", "none"] = "zscore"
    window: tuple[float, float] | None = None
    """CT window (HU) for ``ct_window``; values are clipped to it, then scaled to [0, 1]."""

    @model_validator(mode="after")
    def _window_for_ct(self) -> NormalizationConfig:
        if self.kind == "ct_window" and self.window is None:
            raise ValueError("normalization kind 'ct_window' needs window: [low, high] in HU")
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high, got {self.window}")
        return self


class PreprocessingConfig(_Frozen):
    """Deterministic preprocessing (cached) and training-time sampling/augmentation."""

    target_spacing: Triple | None = None
    """Voxel spacing in mm after resampling; ``None``: planned from the sites' fingerprints."""
    orientation: str = "RAS"
    normalization: dict[str, NormalizationConfig] = Field(default_factory=dict)
    """Per modality; modalities not named get z-score over the foreground (MR)."""
    crop_foreground: bool = True
    patch_size: IntTriple = (64, 64, 64)
    patches_per_case: PositiveInt = 2
    """Patches drawn from one case each time it is visited in an epoch."""
    class_balance: bool = True
    """Sample patch centres balanced over foreground classes so small classes are seen."""
    augment: bool = True
    max_case_megavoxels: PositiveFloat = 64.0
    """``fedmed data check`` flags images larger than this (per channel)."""
    affine_tolerance_mm: PositiveFloat = 1.0
    """Largest allowed difference between two files' affines (mm); default 1 mm."""
    cache_dir: Path | None = None
    """Where preprocessed cases go; default ``<site>/.fedmed-cache``."""

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, v: Triple | None) -> Triple | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError(f"target_spacing must be positive (mm), got {v}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, v: IntTriple) -> IntTriple:
        if any(s < 8 for s in v):
            raise ValueError(f"patch_size must be at least 8 voxels per axis, got {v}")
        return v


class ModelConfig(_Frozen):
    """Network architecture (see :mod:`fedmed.models`)."""

    architecture: Architecture = "unet"
    """``unet``: early fusion (modalities as channels); ``fusion``: one encoder per modality."""
    channels: tuple[PositiveInt, ...] = (16, 32, 64, 128)
    strides: tuple[PositiveInt, ...] | None = None
    """Down-sampling per level; default 2 at every level."""
    num_res_units: Annotated[int, Field(ge=0)] = 2
    norm: Literal["instance", "group"] = "instance"
    groups: PositiveInt = 8
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    modality_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Chance that a training patch loses one modality (never its last), for sites lacking one."""
    droppable_modalities: tuple[str, ...] | None = None
    """What ``modality_dropout`` may hide, e.g. ``[FLAIR]``; ``None``: any modality."""

    @model_validator(mode="after")
    def _levels(self) -> ModelConfig:
        if len(self.channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {list(self.channels)}")
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(self.channels) - 1} entries, "
                f"got {len(self.strides)}"
            )
        if self.norm == "group" and any(c % self.groups for c in self.channels):
            raise ValueError(
                f"group norm with groups={self.groups} needs every channel count divisible by it, "
                f"got channels={list(self.channels)}"
            )
        return self


class LossConfig(_Frozen):
    """Dice + cross-entropy."""

    dice_weight: Annotated[float, Field(ge=0)] = 1.0
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    class_weights: tuple[PositiveFloat, ...] | None = None
    """Cross-entropy weight per class (background first); ``None``: uniform."""


class TrainingConfig(_Frozen):
    """The local trainer, shared by the centralized, local and federated modes."""

    epochs: PositiveInt = 20
    """Passes over the training cases (centralized/local); federated: see ``federation``."""
    batch_size: PositiveInt = 2
    accumulate: PositiveInt = 1
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    learning_rate: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    loss: LossConfig = Field(default_factory=LossConfig)
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported); ignored on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.15
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    """Each site's cases split deterministically (by seed) into train / val / test."""
    sw_overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    sw_batch_size: PositiveInt = 2
    postprocess_lcc: bool = False
    """Keep the largest connected component per class after inference."""
    num_workers: Annotated[int, Field(ge=0)] = 0
    progress: bool = True

    @model_validator(mode="after")
    def _splits(self) -> TrainingConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "val_fraction + test_fraction must leave at least 10% of cases for training, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class ClientResources(_Frozen):
    """Resources of one simulated site (Flower simulation backend)."""

    num_cpus: PositiveFloat = 1
    num_gpus: Annotated[float, Field(ge=0)] = 0.0


class FederationSettings(_Frozen):
    """Flower strategy and rounds."""

    strategy: StrategyName = "fedavg"
    rounds: PositiveInt = 10
    local_epochs: PositiveInt = 2
    """Passes over a site's own training cases per round."""
    keep_optimizer_state: bool = False
    """A site resumes its own optimiser moments (AdamW / momentum) from its last round instead
    of starting a fresh optimiser every round (kept in the site's state dir; non-DP training
    only: DP fits start a fresh optimiser each round)."""
    fraction_train: Annotated[float, Field(gt=0, le=1)] = 1.0
    min_train_sites: PositiveInt = 1
    min_available_sites: PositiveInt = 1
    proximal_mu: Annotated[float, Field(ge=0)] = 0.01
    server_learning_rate: PositiveFloat = 0.1
    """FedAdam / FedYogi server-side learning rate (eta)."""
    server_beta_1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    server_beta_2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    server_tau: PositiveFloat = 1e-3
    trim_beta: Annotated[float, Field(ge=0, lt=0.5)] = 0.2
    round_timeout_s: PositiveFloat = 3600.0
    """How long the coordinator waits for the sites' replies in one round."""
    evaluate_sites: bool = True
    """Federated evaluation on the sites' validation cases every round."""
    client_resources: ClientResources = Field(default_factory=ClientResources)
    max_parallel_sites: PositiveInt | None = None
    """Simulation: at most this many sites train at once (bounded pool); default: cores."""
    personalization: Literal["none", "finetune", "ditto"] = "none"
    """A model of each site's own besides the global one: ``finetune`` (the final global
    model fine-tuned on the site's training cases after the last round), ``ditto`` (a
    personal model trained every round, pulled towards the global one; Li et al. 2021) or
    ``none``. Each site scores both on its own test cases in a final round
    (:mod:`fedmed.federation.personal`)."""
    personalization_epochs: PositiveInt = 4
    """``finetune``: local epochs of fine-tuning (within a site policy's
    ``max_local_epochs``)."""
    ditto_lambda: PositiveFloat = 0.1
    """``ditto``: weight of the pull ``lambda/2 ||v - w||^2`` of a site's personal model ``v``
    towards the round's global model ``w``."""


class PrivacySiteOverride(_Frozen):
    """Per-site DP settings that differ from the federation's."""

    enabled: bool | None = None
    max_epsilon: PositiveFloat | None = None


class PrivacyConfig(_Frozen):
    """Patient-level DP-SGD (Opacus); the privacy unit is the patient."""

    enabled: bool = False
    noise_multiplier: PositiveFloat | None = None
    """sigma; when ``None`` it is computed from ``target_epsilon`` over the planned steps."""
    target_epsilon: PositiveFloat | None = 8.0
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_grad_norm: PositiveFloat = 1.0
    max_epsilon: PositiveFloat | None = None
    """A site stops training when its next round would exceed this; default target_epsilon."""
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_rng: bool = False
    expected_batch_size: PositiveInt = 16
    """Expected number of patients per DP step (Poisson sampling rate = this / cases)."""
    weight_averaging: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Decay of an exponential moving average of the weights over a site's DP steps; the
    site sends the average instead of the last iterate (0: off). Post-processing of released
    noisy steps, so it costs no privacy; it smooths the noise's random walk."""

    @model_validator(mode="after")
    def _sigma_or_target(self) -> PrivacyConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy needs noise_multiplier or target_epsilon when enabled")
        return self


class SecureAggregationConfig(_Frozen):
    """Flower SecAgg+ settings."""

    enabled: bool = False
    num_shares: Annotated[float, Field(gt=0)] = 1.0
    """Shares per site (>1: count; <=1: fraction of sites)."""
    reconstruction_threshold: Annotated[float, Field(gt=0)] = 0.66
    clipping_range: PositiveFloat = 8.0
    quantization_range: PositiveInt = 4194304


class CompressionConfig(_Frozen):
    """What sites send: full float32 weights, or compressed weights/deltas."""

    kind: Literal["none", "float16", "bfloat16", "int8"] = "none"
    deltas: bool = True
    """Send the difference to the global weights (int8 always sends deltas)."""


class TrackingConfig(_Frozen):
    """Run tracking on the coordinator's / researcher's machine (:mod:`fedmed.export.tracking`).

    Never sent to the sites (``tracking`` is stripped from requests, like the paths).
    """

    tensorboard: bool = True
    """TensorBoard event files in ``RUN/tb/`` (needs ``fedmed[tracking]``)."""
    mlflow: bool = False
    """Log the same to MLflow (needs ``fedmed[tracking]``)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI: a server (``http://host:5000``) or a store
    (``sqlite:///path/mlflow.db``); ``None``: ``RUN/mlruns/mlflow.db``, no server."""
    mlflow_experiment: str | None = None
    """MLflow experiment; ``None``: the config's ``name``."""

    @field_validator("mlflow_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", value.strip()):
            raise ValueError(
                f"tracking.mlflow_uri {value!r} is not a URI; give a tracking server "
                "(http://host:5000) or a store (sqlite:////abs/path/mlflow.db), or leave it "
                "unset for RUN/mlruns/mlflow.db"
            )
        return None if value is None else value.strip()

    @field_validator("mlflow_experiment")
    @classmethod
    def _experiment(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("tracking.mlflow_experiment is empty; give a name or leave it unset")
        return value


class FederationConfig(_Frozen):
    """The whole federation: data, preprocessing, model, training, federation, privacy."""

    name: str = "federation"
    root: Path = Path(".")
    """Folder that relative paths are resolved against (the YAML file's folder)."""
    modalities: tuple[str, ...]
    labels: dict[int, str]
    sites: tuple[SiteConfig, ...]
    central_test: Path | None = None
    unseen_sites: tuple[Path, ...] = ()
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        if not self.modalities:
            raise ValueError("modalities must name at least one modality, e.g. [T1]")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities has duplicates: {list(self.modalities)}")
        if 0 not in self.labels:
            raise ValueError("labels must include 0 (background)")
        if sorted(self.labels) != list(range(len(self.labels))):
            raise ValueError(f"labels must be numbered 0..N-1, got {sorted(self.labels)}")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        cw = self.training.loss.class_weights
        if cw is not None and len(cw) != len(self.labels):
            raise ValueError(
                f"training.loss.class_weights needs {len(self.labels)} entries (one per label), "
                f"got {len(cw)}"
            )
        for key, given in (("preprocessing.normalization", tuple(self.preprocessing.normalization)),
                           ("model.droppable_modalities", self.model.droppable_modalities or ())):
            if unknown := sorted(set(given) - set(self.modalities)):
                raise ValueError(f"{key} names unknown modalities {unknown}; modalities are "
                                 f"{list(self.modalities)}")
        return self

    @property
    def num_classes(self) -> int:
        """Number of labels including background."""
        return len(self.labels)

    def site(self, name: str) -> SiteConfig:
        """The site called ``name``.

        Raises:
            ConfigError: no such site; the message lists the known ones.
        """
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"no site named {name!r} in the config; sites are {self.site_names}")

    @property
    def site_names(self) -> list[str]:
        """Names of the training sites, in config order."""
        return [s.name for s in self.sites]

    def resolve(self, path: Path) -> Path:
        """``path`` made absolute against the config's folder."""
        return path if path.is_absolute() else (self.root / path).resolve()

    def site_dir(self, name: str) -> Path:
        """Absolute data folder of site ``name``."""
        return self.resolve(self.site(name).path)

    def site_state_dir(self, name: str) -> Path:
        """Absolute state folder of site ``name`` (simulation; deployment: node config)."""
        given = self.site(name).state_dir
        return self.resolve(given) if given is not None else self.site_dir(name) / STATE_DIR_NAME

    def privacy_for(self, name: str) -> PrivacyConfig:
        """The privacy settings of site ``name`` with its overrides applied."""
        override = self.site(name).privacy
        if override is None:
            return self.privacy
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return self.privacy.model_copy(update=changes)

    def with_changes(self, **sections: Mapping[str, Any]) -> FederationConfig:
        """A validated copy with some fields of some sections replaced.

        Example: ``cfg.with_changes(federation={"rounds": 3})``.
        """
        data = self.model_dump()
        for section, changes in sections.items():
            if section not in data:
                raise ConfigError(f"unknown config section {section!r}")
            if isinstance(data[section], dict):
                data[section] = {**data[section], **dict(changes)}
            else:
                data[section] = changes
        return _validate(data, source="(modified config)")


SiteConfig.model_rebuild()


def validation_lines(exc: ValidationError) -> str:
    """One line per problem of a pydantic error: the dotted key, what is wrong, what came."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r:.80})")
    return "\n".join(lines)


def _validate(data: Mapping[str, Any], source: str) -> FederationConfig:
    try:
        return FederationConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(
            f"invalid federation config {source}:\n{validation_lines(exc)}"
        ) from None


def load_config(path: str | Path) -> FederationConfig:
    """Read and validate a federation config.

    Args:
        path: the YAML file; relative paths inside are resolved against its folder.

    Returns:
        The frozen, validated config.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation; the message
            names each offending key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"federation config {p} does not exist (expected a YAML file)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"federation config {p} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"federation config {p} must be a mapping, got {type(raw).__name__}")
    raw.setdefault("root", str(p.resolve().parent))
    return _validate(raw, source=str(p))


def config_from_dict(data: Mapping[str, Any], root: Path | None = None) -> FederationConfig:
    """Validate a config given as a mapping (e.g. read back from a checkpoint)."""
    d = dict(data)
    if root is not None:
        d["root"] = str(root)
    return _validate(d, source="(mapping)")


def dump_config(cfg: FederationConfig, path: Path) -> None:
    """Write the resolved config as YAML (used for ``RUN/config.yaml``)."""
    data = cfg.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
