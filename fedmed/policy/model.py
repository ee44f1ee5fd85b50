"""The site policy as a validated, frozen model, and the checks it makes on a request."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmed.config import Architecture, FederationConfig, PrivacyConfig, StrategyName
from fedmed.policy.reasons import ReasonCode, refuse

FAB_HASH_PATTERN = r"^[0-9a-f]{64}$"
"""A Flower app bundle's hash: SHA-256 of the ``.fab`` file, 64 lower-case hex digits."""

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PrivacyPolicy(_Frozen):
    """Differential privacy the site insists on."""

    dp_required: bool = True
    """Refuse to train without patient-level DP (``dp-required``)."""
    min_noise_multiplier: PositiveFloat | None = 0.8
    """Floor on sigma, requested or computed from the target epsilon (``noise-below-floor``)."""
    max_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_clipping_norm: PositiveFloat | None = 1.0
    lifetime_epsilon: PositiveFloat | None = 10.0
    """Cap on epsilon composed over every run that used this dataset (``None``: no cap)."""
    dataset_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Names the dataset in the lifetime ledger; default: a hash of the site's case list, so
    adding cases starts a new dataset. Set it to keep composing across such changes."""


class SecureAggregationPolicy(_Frozen):
    """Whether updates leave only masked."""

    required: bool = True
    min_participants: Annotated[int, Field(ge=2)] = 3
    """Fewest sites in a secure sum this site takes part in."""


class TrainingPolicy(_Frozen):
    """What may be trained here, and how much per run."""

    allowed_strategies: tuple[StrategyName, ...] = ("fedavg", "fedprox")
    allowed_architectures: tuple[Architecture, ...] = ("unet", "fusion")
    max_rounds: PositiveInt | None = 200
    max_local_epochs: PositiveInt | None = 5


class ReportingPolicy(_Frozen):
    """What the site's metrics may reveal."""

    min_cases_per_metric: PositiveInt = 10
    """k: every metric the site sends is computed on at least this many cases."""
    decimals: Annotated[int, Field(ge=0, le=6)] = 2
    """Metrics are rounded to this many decimals before they leave."""
    training_loss: Literal["always", "without_dp", "never"] = "without_dp"
    """Whether the mean training loss is sent (under DP only with ``always``)."""


class DataPolicy(_Frozen):
    """The site's own data split and loading limits (no coordinator setting touches them)."""

    val_fraction: Fraction = 0.15
    test_fraction: Fraction = 0.2
    split_seed: int = 0
    """The split is drawn once with this seed and then kept in the state folder."""
    max_image_megavoxels: PositiveFloat = 64.0
    """Images whose header claims more voxels per channel are refused before reading."""

    @model_validator(mode="after")
    def _room_for_training(self) -> DataPolicy:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "data.val_fraction + data.test_fraction must leave at least 10% of the cases "
                f"for training, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class ApprovedApp(_Frozen):
    """A Flower app bundle the hospital approved to run next to its data."""

    fab_hash: str = Field(pattern=FAB_HASH_PATTERN)
    approved_by: str = Field(min_length=1)
    approved_at: str
    """ISO 8601, UTC."""
    note: str = ""


class SitePolicy(_Frozen):
    """The whole site policy (see the module docstring and ``docs/site-policy.md``)."""

    version: Literal[1] = 1
    site: str | None = None
    privacy: PrivacyPolicy = Field(default_factory=PrivacyPolicy)
    secure_aggregation: SecureAggregationPolicy = Field(default_factory=SecureAggregationPolicy)
    training: TrainingPolicy = Field(default_factory=TrainingPolicy)
    reporting: ReportingPolicy = Field(default_factory=ReportingPolicy)
    data: DataPolicy = Field(default_factory=DataPolicy)
    approved_apps: tuple[ApprovedApp, ...] = ()

    def is_approved(self, fab_hash: str) -> bool:
        """Whether the app bundle with this SHA-256 hash may run at the site."""
        return any(a.fab_hash == fab_hash.lower() for a in self.approved_apps)

    def round_metric(self, value: float) -> float:
        """``value`` rounded as the policy says (NaN stays NaN)."""
        return value if value != value else round(float(value), self.reporting.decimals)

    def check_request(
        self,
        cfg: FederationConfig,
        *,
        site: str,
        training: bool,
        secure: bool,
        total_rounds: int,
        local_epochs: int,
        upload: bool = True,
    ) -> None:
        """Refuse what the policy forbids in a request (before any data is read).

        Args:
            cfg: the federation config the coordinator sent, as the site rebuilt it.
            site: this site's name (its per-site privacy override applies).
            training: a train request (DP and secure aggregation apply to updates only).
            secure: the request arrived through secure aggregation (SecAgg+).
            total_rounds: the run's planned rounds.
            local_epochs: this request's local epochs (the final round's fine-tuning too).
            upload: the reply carries an update. Secure aggregation concerns updates that
                leave: a train request whose reply holds aggregate metrics only (the final
                personalisation round) needs none; DP and the ceilings still apply.

        Raises:
            RequestRefused: with the first reason code that applies.
        """
        t = self.training
        strategy = cfg.federation.strategy
        if strategy not in t.allowed_strategies:
            refuse(ReasonCode.STRATEGY_NOT_ALLOWED,
                    f"strategy {strategy!r}; allowed: {list(t.allowed_strategies)}")
        arch = cfg.model.architecture
        if arch not in t.allowed_architectures:
            refuse(ReasonCode.ARCHITECTURE_NOT_ALLOWED,
                    f"architecture {arch!r}; allowed: {list(t.allowed_architectures)}")
        if not training:
            return
        if t.max_rounds is not None and total_rounds > t.max_rounds:
            refuse(ReasonCode.ROUNDS_ABOVE_CEILING, f"{total_rounds} rounds > {t.max_rounds}")
        if t.max_local_epochs is not None and local_epochs > t.max_local_epochs:
            refuse(ReasonCode.LOCAL_EPOCHS_ABOVE_CEILING,
                    f"{local_epochs} local epochs > {t.max_local_epochs}")
        self._check_privacy(cfg.privacy_for(site))
        sa = self.secure_aggregation
        if not upload:
            return
        if sa.required and not secure:
            refuse(ReasonCode.SECAGG_REQUIRED, "a plain (unmasked) train request")
        if sa.required and cfg.federation.min_train_sites < sa.min_participants:
            refuse(ReasonCode.TOO_FEW_SECAGG_PARTICIPANTS,
                    f"federation.min_train_sites {cfg.federation.min_train_sites} < "
                    f"{sa.min_participants}")

    def _check_privacy(self, priv: PrivacyConfig) -> None:
        p = self.privacy
        if not priv.enabled:
            if p.dp_required:
                refuse(ReasonCode.DP_REQUIRED, "privacy.enabled is false")
            return
        if priv.delta > p.max_delta:
            refuse(ReasonCode.DELTA_ABOVE_CEILING, f"delta {priv.delta} > {p.max_delta}")
        if p.max_clipping_norm is not None and priv.max_grad_norm > p.max_clipping_norm:
            refuse(ReasonCode.CLIPPING_ABOVE_CEILING,
                    f"max_grad_norm {priv.max_grad_norm} > {p.max_clipping_norm}")
        if priv.noise_multiplier is not None:
            self.check_noise(priv.noise_multiplier)

    def check_noise(self, sigma: float) -> None:
        """Refuse a noise multiplier below the floor (requested, or planned by the site).

        Raises:
            RequestRefused: ``noise-below-floor``.
        """
        floor = self.privacy.min_noise_multiplier
        if floor is not None and sigma < floor:
            refuse(ReasonCode.NOISE_BELOW_FLOOR, f"noise multiplier {sigma:.4g} < {floor}")

    def check_lifetime_epsilon(self, epsilon_after: float) -> None:
        """Refuse training that would take the dataset's lifetime epsilon past the cap.

        Raises:
            RequestRefused: ``epsilon-cap-reached``.
        """
        cap = self.privacy.lifetime_epsilon
        if cap is not None and epsilon_after > cap:
            refuse(ReasonCode.EPSILON_CAP_REACHED,
                    f"lifetime epsilon would reach {epsilon_after:.4g} > cap {cap}")

    def check_cases_for_metric(self, num_cases: int) -> None:
        """Refuse a metric over fewer than k cases.

        Raises:
            RequestRefused: ``too-few-cases-for-metric``.
        """
        k = self.reporting.min_cases_per_metric
        if num_cases < k:
            refuse(ReasonCode.TOO_FEW_CASES_FOR_METRIC, f"{num_cases} cases < k = {k}")

    def may_report_loss(self, dp: bool, num_cases: int) -> bool:
        """Whether the training loss over ``num_cases`` cases may leave the site."""
        allowed = self.reporting.training_loss == "always" or (
            self.reporting.training_loss == "without_dp" and not dp
        )
        return allowed and num_cases >= self.reporting.min_cases_per_metric
