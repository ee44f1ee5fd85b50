"""The site policy: what a hospital's installation will and will not do, whatever it is asked.

The policy is the hospital's, not the coordinator's: a YAML file on the hospital's machine
(``site-policy.yaml``), named in the SuperNode's node config
(``policy='/etc/fedmed/site-policy.yaml'``), validated once into the frozen
:class:`SitePolicy` (unknown keys are errors). Every request from the coordinator is checked
against it at the site before any data is read (:mod:`fedmed.federation.protocol`); what it
forbids is refused with a :class:`ReasonCode`, never silently strengthened, so the
coordinator knows what it gets.

Keys that a file leaves out take the strict defaults of :func:`default_policy_text` (what
``fedmed site policy init`` writes). In simulation every simulated site gets the policy its
federation config names (``sites[].policy``) or, when it names none, :func:`policy_permitting`
the config's own settings (the researcher is every party there).
"""

from fedmed.policy.files import (
    approve_app,
    default_policy_text,
    fab_hash_of,
    load_policy,
    policy_sources,
    write_default_policy,
)
from fedmed.policy.model import (
    ApprovedApp,
    DataPolicy,
    PrivacyPolicy,
    ReportingPolicy,
    SecureAggregationPolicy,
    SitePolicy,
    TrainingPolicy,
)
from fedmed.policy.reasons import ReasonCode, refuse
from fedmed.policy.simulation import policy_permitting, site_policy_for

__all__ = [
    "ApprovedApp",
    "DataPolicy",
    "PrivacyPolicy",
    "ReasonCode",
    "ReportingPolicy",
    "SecureAggregationPolicy",
    "SitePolicy",
    "TrainingPolicy",
    "approve_app",
    "default_policy_text",
    "fab_hash_of",
    "load_policy",
    "policy_permitting",
    "policy_sources",
    "refuse",
    "site_policy_for",
    "write_default_policy",
]
