"""Site policies in simulation, where the researcher is every party."""

from __future__ import annotations

from fedmed.config import FederationConfig
from fedmed.policy.files import load_policy
from fedmed.policy.model import (
    DataPolicy,
    PrivacyPolicy,
    ReportingPolicy,
    SecureAggregationPolicy,
    SitePolicy,
    TrainingPolicy,
)


def policy_permitting(cfg: FederationConfig, *, site: str | None = None) -> SitePolicy:
    """A policy that allows exactly what ``cfg`` asks (simulation without a named policy).

    The researcher is every party in a simulation, so nothing is refused; DP and secure
    aggregation are required when the config switches them on, so a simulated run still
    exercises the same checks. Metrics keep four decimals and need one case.
    """
    priv = cfg.privacy_for(site) if site is not None else cfg.privacy
    return SitePolicy(
        site=site,
        privacy=PrivacyPolicy(
            dp_required=priv.enabled, min_noise_multiplier=None, max_delta=priv.delta,
            max_clipping_norm=None, lifetime_epsilon=None,
        ),
        secure_aggregation=SecureAggregationPolicy(
            required=cfg.secure_aggregation.enabled, min_participants=2,
        ),
        training=TrainingPolicy(
            allowed_strategies=("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian",
                                "fedtrimmedavg", "fedbn"),
            allowed_architectures=("unet", "fusion"), max_rounds=None, max_local_epochs=None,
        ),
        reporting=ReportingPolicy(min_cases_per_metric=1, decimals=4, training_loss="always"),
        data=DataPolicy(
            val_fraction=cfg.training.val_fraction, test_fraction=cfg.training.test_fraction,
            split_seed=cfg.training.seed,
            max_image_megavoxels=cfg.preprocessing.max_case_megavoxels,
        ),
    )


def site_policy_for(cfg: FederationConfig, site: str) -> SitePolicy:
    """The policy a simulated site enforces.

    The file its config entry names (``sites[].policy``), else :func:`policy_permitting`.

    Raises:
        PolicyError: the named policy file is missing or invalid.
        ConfigError: no such site.
    """
    named = cfg.site(site).policy
    if named is not None:
        return load_policy(cfg.resolve(named))
    return policy_permitting(cfg, site=site)
