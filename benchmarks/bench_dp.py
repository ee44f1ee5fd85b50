"""Patient-level DP-SGD against plain FedAvg: the Dice it costs, and whether the ledger is right.

The acceptance measurement of patient-level differential privacy (``docs/privacy.md``,
"Measured"). One generated federation, made once and cached under the temp dir: 4 sites with
equal cohorts (the generator's default skew would leave the smallest site with 0.6x the
mean, and DP needs patients) of 480 training patients each, voxels 2x larger than the
generator's default (``scale=2``), resampled to 4.4 mm (volumes ~37x45x40 after foreground
cropping), and 24 central test cases. The same small U-Net (channels 8, 16, 32, no
residual units, group norm with 8 groups -- per-sample gradients need no BatchNorm, and group
norm does not mix patients) with 32^3 patches and Dice + CE is trained twice with the same
FedAvg schedule, 6 rounds x 4 local epochs:

* **non-DP**: every patient gives one patch per epoch, batches of 2, AdamW lr 3e-3, class
  weights CSF 2, lesion 5 (its best setting);
* **DP**: patient-level DP-SGD (``privacy.enabled``): Poisson sampling of patients with an
  expected batch of 64 (q = 0.133, 192 steps per site), one patch per sampled patient,
  per-patient clipping at 1.0, Gaussian noise with sigma computed from ``target_epsilon = 8``
  at ``delta = 1e-5`` over the planned run, RDP accounting in each site's ledger, AdamW lr
  2e-2, class weights CSF 4, lesion 40, and the site sends the moving average (decay 0.9)
  of its noisy iterates (``privacy.weight_averaging``).

How the DP settings were chosen (in-process FedAvg of the same sites, central mean Dice;
``docs/privacy.md`` has the whole table). At 120 patients per site the best reached 0.48
(0.64x). At 480 patients, expected batch 64 (sigma 1.44) gave 0.51 with the non-DP class
weights, and the lesion class was still never learnt; with the noise truly off (sigma 1e-6,
clipping kept) the same schedule reached 0.71 (lesion 0.63), so the noise, not the schedule,
is what hides the lesions. Per-patient gradient norms are 10-25, so every gradient is
clipped to 1 and the per-coordinate noise (sigma / batch) outweighs the small lesion
gradient. Weighing the lesion (40) and CSF (4) classes up in the DP loss, and averaging the
noisy iterates, gave 0.62 (lesion 0.46). What did not help: expected batch 128 (0.50), a 4x
smaller network (0.50), Adam with the noise variance taken out of its second moment
(DP-AdamBC, 0.51).

Figures:

* ``dp_dice_ratio``: central mean Dice of DP over non-DP (target >= 0.80; goal 0.95);
* ``nondp_dice`` and ``dp_dice``: the two central mean Dice (informational), with the Dice
  per class of both runs in the detail;
* ``dp_dice_<class>``: DP Dice per class, with the non-DP Dice of the class;
* ``dp_sigma``: the noise multiplier the sites computed (from their ledgers' plan);
* ``dp_max_epsilon``: the largest epsilon any site reported in ``summary.json``
  (target <= 8);
* ``ledger_epsilon_error``: the largest relative difference, over sites, between the epsilon
  in ``summary.json`` and an independent recomputation: a fresh Opacus ``RDPAccountant``
  fed the ledger's logged ``(sigma, sampling rate, steps)`` of every fit, unmerged
  (target <= 1%).

``quick`` runs the same pipeline on a tiny federation (2 sites x 24 patients, 1 round x 1
epoch, expected batch 8) as a smoke run; its Dice figures mean nothing. The full run
generates its federation once (~6 min on 2 cores); both runs then take ~12 min on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import _fixtures as fx
from benchmarks.common import Figure

NAME = "dp"
TARGET_RATIO = 0.80
TARGET_EPSILON = 8.0
DELTA = 1e-5


class Setup(NamedTuple):
    """One benchmark size: the federation and the training schedule."""

    sites: int
    cases_per_site: int
    test_cases: int
    rounds: int
    local_epochs: int
    expected_batch_size: int
    scale: float = 2.0
    target_spacing: float = 4.4
    patch: int = 32
    channels: tuple[int, ...] = (8, 16, 32)


class Optim(NamedTuple):
    """Optimiser and loss settings of one arm."""

    optimizer: str
    learning_rate: float
    # CSF (thin at 4.4 mm) and the lesions (small) are the classes learnt last
    class_weights: tuple[float, ...] = (1.0, 2.0, 1.0, 1.0, 5.0)
    max_grad_norm: float = 1.0
    weight_averaging: float = 0.0
    schedule: str = "cosine"


FULL = Setup(sites=4, cases_per_site=480, test_cases=24, rounds=6, local_epochs=4,
             expected_batch_size=64)
QUICK = Setup(sites=2, cases_per_site=24, test_cases=4, rounds=1, local_epochs=1,
              expected_batch_size=8)
NON_DP = Optim("adamw", 3e-3)
# the lesion and CSF gradients are the first drowned by the noise: weigh them up, and send
# the moving average of the noisy iterates
DP_TUNED = Optim("adamw", 2e-2, class_weights=(1.0, 4.0, 1.0, 1.0, 40.0), max_grad_norm=1.0,
                 weight_averaging=0.9)


def federation(setup: Setup, seed: int = 0) -> Path:
    """The generated federation of ``setup`` (equal cohorts), made once and cached.

    Returns:
        Path of its ``federation.yaml``.
    """
    from fedmed.data.synth import default_scanners

    key = (f"dp-s{setup.sites}-c{setup.cases_per_site}-t{setup.test_cases}"
           f"-x{setup.scale:g}-eq-seed{seed}")
    # equal cohorts: the default skew (weights 1.6 : 1 : 0.8 : 0.6) would give the smallest
    # site too few patients for a meaningful patient-level guarantee
    scanners = [replace(p, cohort_weight=1.0) for p in default_scanners(setup.sites, seed)]
    return fx.cached_federation(
        key, sites=setup.sites, cases_per_site=setup.cases_per_site,
        test_cases=setup.test_cases, seed=seed, scale=setup.scale, workers=2,
        scanners=scanners,
    )


def config(yaml_path: Path, setup: Setup, optim: Optim, *, dp: bool) -> Any:
    """The benchmark's config of one arm (non-DP or DP) of ``setup``."""
    from fedmed.config import config_from_dict

    base = fx.small_config(
        yaml_path, sites=setup.sites, channels=setup.channels, num_res_units=0,
        patch=setup.patch, target_spacing=setup.target_spacing, rounds=setup.rounds,
        local_epochs=setup.local_epochs, patches_per_case=1,
        learning_rate=optim.learning_rate,
    )
    data = base.model_dump()
    data["model"].update(norm="group", groups=8)
    data["training"].update(
        optimizer=optim.optimizer, schedule=optim.schedule,
        loss={"class_weights": list(optim.class_weights)},
    )
    data["privacy"].update(
        enabled=dp, noise_multiplier=None, target_epsilon=TARGET_EPSILON, delta=DELTA,
        max_grad_norm=optim.max_grad_norm, accountant="rdp",
        expected_batch_size=setup.expected_batch_size, weight_averaging=optim.weight_averaging,
    )
    return config_from_dict(data)


def recompute_epsilon(ledger: dict[str, Any]) -> float:
    """Epsilon of a ledger file's logged fits by a fresh Opacus RDP accountant.

    Independent of :mod:`fedmed.training.ledger`: the entries are fed one by one (no
    merging), from the fields the file logs.
    """
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [
        (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        for e in ledger["entries"]
    ]
    return float(acc.get_epsilon(delta=float(ledger["delta"])))


def run_arm(yaml_path: Path, setup: Setup, optim: Optim, *, dp: bool) -> dict[str, Any]:
    """Train one arm by FedAvg in simulation; its summary plus every site's ledger."""
    from fedmed.federation.simulation import run_federated

    cfg = config(yaml_path, setup, optim, dp=dp)
    fx.warm_cache(cfg)
    out = fx.run_dir("dp" if dp else "nondp")
    try:
        summary = run_federated(cfg, out, force=True)
        run_id = (out / "run-id").read_text().strip()
        ledgers = {}
        # each site's ledger of this run, in its own state folder (lifetime ledgers per dataset)
        for site in cfg.site_names:
            for p in sorted(cfg.site_state_dir(site).glob(f"privacy/*/ledger-{run_id}-*.json")):
                data = json.loads(p.read_text())
                ledgers[str(data["site"])] = data
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"summary": summary, "ledgers": ledgers, "optim": optim._asdict(), "dp": dp}


def _classes(dice: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v):.3f}" for k, v in dice.items())


def measure(setup: Setup, non_dp: Optim, dp: Optim) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both arms of ``setup``: ``(non_dp_run, dp_run)``."""
    yaml_path = federation(setup)
    return (run_arm(yaml_path, setup, non_dp, dp=False), run_arm(yaml_path, setup, dp, dp=True))


def figures(setup: Setup, base: dict[str, Any], priv: dict[str, Any]) -> list[Figure]:
    """The benchmark's figures from the two runs."""
    b, p = base["summary"], priv["summary"]
    b_dice, p_dice = float(b["dice_mean"]), float(p["dice_mean"])
    ratio = p_dice / b_dice if b_dice > 0 else 0.0
    eps = {k: float(v) for k, v in (p.get("epsilon") or {}).items()}
    ledgers = priv["ledgers"]
    sigmas = sorted({float(e["noise_multiplier"]) for d in ledgers.values() for e in d["entries"]})
    steps = {s: sum(int(e["steps"]) for e in d["entries"]) for s, d in ledgers.items()}
    rates = {s: float(d["entries"][0]["sample_rate"]) for s, d in ledgers.items() if d["entries"]}
    patients = {s: int(d["entries"][0]["num_cases"]) for s, d in ledgers.items() if d["entries"]}
    errors = {
        s: abs(recompute_epsilon(ledgers[s]) - eps[s]) / max(eps[s], 1e-12)
        for s in eps if s in ledgers
    }
    max_err = max(errors.values()) if errors and len(errors) == len(eps) else float("inf")
    fed = (
        f"{setup.sites} sites x {setup.cases_per_site} patients (equal cohorts, generated, "
        f"scale {setup.scale:g}, resampled to {setup.target_spacing:g} mm), "
        f"{setup.test_cases} central test cases; U-Net {list(setup.channels)}, group norm, "
        f"{setup.patch}^3 patches; FedAvg {setup.rounds} rounds x {setup.local_epochs} local "
        f"epochs for both runs"
    )
    dp_o, nd_o = priv["optim"], base["optim"]
    dp_setup = (
        f"DP: expected batch {setup.expected_batch_size} patients (q per site "
        f"{', '.join(f'{s} {q:.3f}' for s, q in rates.items())}), steps per site "
        f"{', '.join(f'{s} {n}' for s, n in steps.items())}, {dp_o['optimizer']} lr "
        f"{dp_o['learning_rate']:g}, clip {dp_o['max_grad_norm']:g}, class weights "
        f"{list(dp_o['class_weights'])}, weight averaging {dp_o['weight_averaging']:g}; "
        f"non-DP: batch 2, {nd_o['optimizer']} lr {nd_o['learning_rate']:g}, class weights "
        f"{list(nd_o['class_weights'])}"
    )
    extra = {"setup": setup._asdict(), "non_dp": b, "dp": p, "epsilon": eps, "errors": errors,
             "sigma": sigmas, "steps": steps, "sample_rate": rates, "patients": patients,
             "optim": {"non_dp": nd_o, "dp": dp_o}}
    out = [
        Figure(NAME, "dp_dice_ratio", ratio, "x", f">= {TARGET_RATIO:.2f} (goal 0.95)",
               ratio >= TARGET_RATIO,
               f"central mean Dice DP {p_dice:.4f} / non-DP {b_dice:.4f} at epsilon <= "
               f"{TARGET_EPSILON:g}, delta {DELTA:g} per site; {fed}; {dp_setup}", extra),
        Figure(NAME, "nondp_dice", b_dice, "Dice", "(reported)", None,
               f"non-DP FedAvg central mean Dice; per class: "
               f"{_classes(b.get('dice_per_class', {}))}"),
        Figure(NAME, "dp_dice", p_dice, "Dice", "(reported)", None,
               f"DP FedAvg central mean Dice; per class: {_classes(p.get('dice_per_class', {}))}"),
    ]
    base_cls = b.get("dice_per_class", {})
    for cls, v in (p.get("dice_per_class") or {}).items():
        ref = base_cls.get(cls)
        out.append(Figure(
            NAME, f"dp_dice_{cls}", float(v), "Dice", "(reported)", None,
            f"DP Dice of {cls}" + (f" (non-DP {float(ref):.4f})" if ref is not None else ""),
        ))
    out += [
        Figure(NAME, "dp_sigma", sigmas[0] if len(sigmas) == 1 else max(sigmas, default=0.0),
               "sigma", "(reported)", None,
               f"noise multiplier from target epsilon {TARGET_EPSILON:g} over the planned "
               f"{setup.rounds * setup.local_epochs} epochs (sites: "
               f"{', '.join(f'{s:.4f}' for s in sigmas)}); {dp_setup}"),
        Figure(NAME, "dp_max_epsilon", max(eps.values(), default=float("inf")), "epsilon",
               f"<= {TARGET_EPSILON:g}", bool(eps) and max(eps.values()) <= TARGET_EPSILON,
               f"epsilon per site at delta {DELTA:g} (summary.json): "
               f"{', '.join(f'{s} {e:.4f}' for s, e in eps.items())}"),
        Figure(NAME, "ledger_epsilon_error", max_err * 100, "%", "<= 1%", max_err <= 0.01,
               "largest relative difference over sites between summary.json's epsilon and a "
               "fresh opacus RDPAccountant fed the ledger's logged (sigma, q, steps) per fit: "
               f"{', '.join(f'{s} {e:.2e}' for s, e in errors.items())}"),
    ]
    return out


def run(quick: bool = False) -> list[Figure]:
    """Non-DP and DP FedAvg side by side (``quick``: the tiny smoke size)."""
    setup = QUICK if quick else FULL
    base, priv = measure(setup, NON_DP, DP_TUNED)
    return figures(setup, base, priv)


if __name__ == "__main__":
    for f in run(quick="--quick" in sys.argv):
        print(f"{f.name}: {f.value:.4g} {f.unit} (target {f.target}, met {f.met}) -- {f.detail}")
