"""The site policy: its file, its defaults, its checks, and the codes they refuse with."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedmed.config import FederationConfig, config_from_dict
from fedmed.errors import PolicyError, RequestRefused
from fedmed.policy import (
    ReasonCode,
    SitePolicy,
    approve_app,
    default_policy_text,
    fab_hash_of,
    load_policy,
    policy_permitting,
    policy_sources,
    write_default_policy,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "configs" / "template-site-policy.yaml"


def _cfg(**sections: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "modalities": ["T1"], "labels": {0: "bg", 1: "fg"},
        "sites": [{"name": "a", "path": "a"}],
        "federation": {"strategy": "fedavg", "rounds": 10, "local_epochs": 2,
                       "min_train_sites": 3},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5,
                    "max_grad_norm": 1.0},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base, root=Path("/data"))


def test_the_shipped_template_is_the_strict_default(tmp_path: Path) -> None:
    assert TEMPLATE.read_text() == default_policy_text()
    policy = load_policy(TEMPLATE)
    assert policy == SitePolicy()  # every key of the file is the model's strict default
    assert policy.privacy.dp_required and policy.secure_aggregation.required
    assert policy.reporting.min_cases_per_metric == 10
    with pytest.raises(PolicyError, match="already exists"):
        write_default_policy(TEMPLATE)


@pytest.mark.parametrize(("text", "named"), [
    ("privacy: {dp_requried: true}", "privacy.dp_requried"),
    ("reporting: {min_cases_per_metric: 0}", "reporting.min_cases_per_metric"),
    ("privacy: {max_delta: 2}", "privacy.max_delta"),
    ("data: {val_fraction: 0.5, test_fraction: 0.5}", "val_fraction + data.test_fraction"),
    ("training: {allowed_strategies: [fedsgd]}", "training.allowed_strategies"),
    ("approved_apps: [{fab_hash: abc, approved_by: x, approved_at: now}]", "fab_hash"),
    ("- a list", "must be a mapping"),
    ("key: [unclosed", "not valid YAML"),
])
def test_bad_policies_are_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match="policy") as err:
        load_policy(path)
    assert named in str(err.value) and str(path) in str(err.value)


def test_sources_say_which_values_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("reporting: {min_cases_per_metric: 25}\n")
    sources = {k: (v, src) for k, v, src in policy_sources(path)}
    assert sources["reporting.min_cases_per_metric"] == (25, str(path))
    assert sources["reporting.decimals"] == (2, "default")
    assert sources["privacy.dp_required"] == (True, "default")


def test_approving_an_app_keeps_the_file_and_records_who(tmp_path: Path) -> None:
    path = write_default_policy(tmp_path / "p.yaml", site="hospital-a")
    fab = tmp_path / "app.fab"
    fab.write_bytes(b"a bundle")
    digest = fab_hash_of(fab)
    assert digest == hashlib.sha256(b"a bundle").hexdigest() == fab_hash_of(digest.upper())
    policy = approve_app(path, digest, "dpo@hospital-a", note="release 1.0")
    assert policy.is_approved(digest) and not policy.is_approved("0" * 64)
    (entry,) = policy.approved_apps
    assert (entry.approved_by, entry.note) == ("dpo@hospital-a", "release 1.0")
    assert entry.approved_at.endswith("+00:00")
    text = path.read_text()
    assert "# fedmed site policy" in text and "min_cases_per_metric: 10" in text  # comments kept
    approve_app(path, "b" * 64, "dpo@hospital-a")
    assert len(load_policy(path).approved_apps) == 2
    with pytest.raises(PolicyError, match="already approved"):
        approve_app(path, digest, "someone")
    with pytest.raises(PolicyError, match="64 hex digits"):
        fab_hash_of(tmp_path / "missing.fab")


STRICT = SitePolicy()


@pytest.mark.parametrize(("cfg", "kwargs", "code"), [
    (_cfg(privacy={"enabled": False}), {}, ReasonCode.DP_REQUIRED),
    (_cfg(privacy={"noise_multiplier": 0.5}), {}, ReasonCode.NOISE_BELOW_FLOOR),
    (_cfg(privacy={"delta": 1e-3}), {}, ReasonCode.DELTA_ABOVE_CEILING),
    (_cfg(privacy={"max_grad_norm": 5.0}), {}, ReasonCode.CLIPPING_ABOVE_CEILING),
    (_cfg(federation={"strategy": "fedmedian"}), {}, ReasonCode.STRATEGY_NOT_ALLOWED),
    (_cfg(model={"architecture": "fusion", "channels": [4, 8]}), {"policy": SitePolicy(
        training={"allowed_architectures": ["unet"]})}, ReasonCode.ARCHITECTURE_NOT_ALLOWED),
    (_cfg(), {"total_rounds": 201}, ReasonCode.ROUNDS_ABOVE_CEILING),
    (_cfg(), {"local_epochs": 6}, ReasonCode.LOCAL_EPOCHS_ABOVE_CEILING),
    (_cfg(), {"secure": False}, ReasonCode.SECAGG_REQUIRED),
    (_cfg(federation={"min_train_sites": 2}), {}, ReasonCode.TOO_FEW_SECAGG_PARTICIPANTS),
])
def test_check_request_refuses_with_its_code(
    cfg: FederationConfig, kwargs: dict[str, Any], code: ReasonCode
) -> None:
    policy = kwargs.pop("policy", STRICT)
    args = {"site": "a", "training": True, "secure": True, "total_rounds": 10,
            "local_epochs": 2, **kwargs}
    with pytest.raises(RequestRefused) as err:
        policy.check_request(cfg, **args)
    assert err.value.code == code.value and code.sentence
    # the sentence that leaves the site names no value
    assert not any(ch.isdigit() for ch in code.sentence)


def test_an_allowed_request_passes_and_evaluation_skips_the_training_checks() -> None:
    STRICT.check_request(_cfg(), site="a", training=True, secure=True, total_rounds=10,
                         local_epochs=2)
    # evaluation sends no update: DP and secure aggregation do not apply to it
    STRICT.check_request(_cfg(privacy={"enabled": False}), site="a", training=False,
                         secure=False, total_rounds=10, local_epochs=2)


def test_a_train_request_that_uploads_nothing_needs_no_secure_aggregation() -> None:
    # the final personalisation round: the site trains (fine-tuning) but replies with
    # aggregate metrics only, so secure aggregation does not apply to it ...
    STRICT.check_request(_cfg(), site="a", training=True, secure=False, total_rounds=10,
                         local_epochs=2, upload=False)
    with pytest.raises(RequestRefused, match="secagg-required"):
        STRICT.check_request(_cfg(), site="a", training=True, secure=False, total_rounds=10,
                             local_epochs=2)
    # ... while DP and the ceilings on rounds and epochs still do
    for cfg, kwargs, code in [
        (_cfg(privacy={"enabled": False}), {}, ReasonCode.DP_REQUIRED),
        (_cfg(), {"local_epochs": 6}, ReasonCode.LOCAL_EPOCHS_ABOVE_CEILING),
        (_cfg(), {"total_rounds": 201}, ReasonCode.ROUNDS_ABOVE_CEILING),
    ]:
        args = {"total_rounds": 10, "local_epochs": 2, **kwargs}
        with pytest.raises(RequestRefused) as err:
            STRICT.check_request(cfg, site="a", training=True, secure=False, upload=False,
                                 **args)
        assert err.value.code == code.value


def test_budget_metric_and_loss_rules() -> None:
    with pytest.raises(RequestRefused, match="noise-below-floor"):
        STRICT.check_noise(0.79)
    STRICT.check_noise(0.8)
    with pytest.raises(RequestRefused, match="epsilon-cap-reached"):
        STRICT.check_lifetime_epsilon(10.01)
    STRICT.check_lifetime_epsilon(10.0)
    with pytest.raises(RequestRefused, match="too-few-cases-for-metric"):
        STRICT.check_cases_for_metric(9)
    STRICT.check_cases_for_metric(10)
    assert STRICT.round_metric(0.87654) == 0.88
    assert STRICT.round_metric(float("nan")) != STRICT.round_metric(float("nan"))
    assert STRICT.may_report_loss(dp=False, num_cases=10)
    assert not STRICT.may_report_loss(dp=True, num_cases=10)
    assert not STRICT.may_report_loss(dp=False, num_cases=9)
    always = SitePolicy(reporting={"training_loss": "always", "min_cases_per_metric": 1})
    assert always.may_report_loss(dp=True, num_cases=1)


def test_the_permitting_policy_allows_exactly_its_config() -> None:
    cfg = _cfg(secure_aggregation={"enabled": True},
               federation={"strategy": "fedbn", "rounds": 500, "local_epochs": 20})
    policy = policy_permitting(cfg, site="a")
    policy.check_request(cfg, site="a", training=True, secure=True, total_rounds=500,
                         local_epochs=20)
    assert policy.privacy.dp_required and policy.secure_aggregation.required
    with pytest.raises(RequestRefused, match="secagg-required"):
        policy.check_request(cfg, site="a", training=True, secure=False, total_rounds=500,
                             local_epochs=20)
    assert yaml.safe_load(yaml.safe_dump(policy.model_dump(mode="json")))["site"] == "a"


def test_policy_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmed.cli.main import main

    out = tmp_path / "site-policy.yaml"
    assert main(["site", "policy", "init", "--out", str(out), "--site", "hospital-a"]) == 0
    assert load_policy(out).site == "hospital-a"
    assert main(["site", "policy", "init", "--out", str(out)]) == 1  # no silent overwrite
    assert main(["site", "policy", "show", "--policy", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "reporting.min_cases_per_metric" in shown and "10" in shown
    assert main(["site", "policy", "show", "--policy", str(tmp_path / "none.yaml")]) == 1
    assert "fedmed site policy init" in capsys.readouterr().err
