"""Reason codes: why a site refused a request, the only thing about a refusal that leaves it."""

from __future__ import annotations

from enum import Enum

from fedmed.errors import RequestRefused


class ReasonCode(str, Enum):
    """Why a site refused a request: the only thing about a refusal that leaves the site."""

    NO_POLICY = "no-policy"
    SITE_NOT_CONFIGURED = "site-not-configured"
    DP_REQUIRED = "dp-required"
    NOISE_BELOW_FLOOR = "noise-below-floor"
    DELTA_ABOVE_CEILING = "delta-above-ceiling"
    CLIPPING_ABOVE_CEILING = "clipping-above-ceiling"
    EPSILON_CAP_REACHED = "epsilon-cap-reached"
    SECAGG_REQUIRED = "secagg-required"
    TOO_FEW_SECAGG_PARTICIPANTS = "too-few-secagg-participants"
    STRATEGY_NOT_ALLOWED = "strategy-not-allowed"
    ARCHITECTURE_NOT_ALLOWED = "architecture-not-allowed"
    ROUNDS_ABOVE_CEILING = "rounds-above-ceiling"
    LOCAL_EPOCHS_ABOVE_CEILING = "local-epochs-above-ceiling"
    TOO_FEW_CASES_FOR_METRIC = "too-few-cases-for-metric"
    SITE_OWNED_SETTING = "site-owned-setting"
    WEIGHTS_NOT_GLOBAL = "weights-not-global"
    INVALID_REQUEST = "invalid-request"
    APP_NOT_APPROVED = "app-not-approved"
    SITE_ERROR = "site-error"

    @property
    def sentence(self) -> str:
        """The human sentence sent with the code (never names a file, a value or a case)."""
        return _SENTENCES[self]


_SENTENCES: dict[ReasonCode, str] = {
    ReasonCode.NO_POLICY: "This site has no usable site policy and takes part in nothing.",
    ReasonCode.SITE_NOT_CONFIGURED: (
        "This site's installation is not configured to take part; its log says what is missing."
    ),
    ReasonCode.DP_REQUIRED: "This site trains only with differential privacy switched on.",
    ReasonCode.NOISE_BELOW_FLOOR: "The requested DP noise is below this site's floor.",
    ReasonCode.DELTA_ABOVE_CEILING: "The requested DP delta is above this site's ceiling.",
    ReasonCode.CLIPPING_ABOVE_CEILING: "The requested clipping norm is above this site's ceiling.",
    ReasonCode.EPSILON_CAP_REACHED: "This would take the site past its lifetime privacy budget.",
    ReasonCode.SECAGG_REQUIRED: "This site sends updates only under secure aggregation.",
    ReasonCode.TOO_FEW_SECAGG_PARTICIPANTS: (
        "Secure aggregation would sum fewer sites than this site requires."
    ),
    ReasonCode.STRATEGY_NOT_ALLOWED: "This site does not take part in this strategy.",
    ReasonCode.ARCHITECTURE_NOT_ALLOWED: "This site does not train this model architecture.",
    ReasonCode.ROUNDS_ABOVE_CEILING: "The run has more rounds than this site allows.",
    ReasonCode.LOCAL_EPOCHS_ABOVE_CEILING: "More local epochs per round than this site allows.",
    ReasonCode.TOO_FEW_CASES_FOR_METRIC: (
        "Too few cases stand behind this metric for this site to report it."
    ),
    ReasonCode.SITE_OWNED_SETTING: (
        "The request sets something only the site decides (paths, folders, its data split)."
    ),
    ReasonCode.WEIGHTS_NOT_GLOBAL: (
        "The weights to evaluate are not a global model this site received in this run."
    ),
    ReasonCode.INVALID_REQUEST: "The request is malformed.",
    ReasonCode.APP_NOT_APPROVED: "This site runs only app bundles its policy approves.",
    ReasonCode.SITE_ERROR: "The site could not complete the request; details are in its log.",
}


def refuse(code: ReasonCode, detail: str) -> None:
    """Raise :class:`~fedmed.errors.RequestRefused` with ``code``; ``detail`` stays local."""
    raise RequestRefused(code.value, detail)


__all__ = ["ReasonCode", "refuse"]
