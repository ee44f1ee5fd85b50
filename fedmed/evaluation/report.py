"""``report.md`` and the terminal table of ``fedmed compare``, from ``comparison.json``.

Sections: the headline table (central test set), each approach on each site's own test
cases, the per-site verdicts (does each hospital gain by joining?), differential privacy
(epsilon per site, the DP outlook and why DP cost what it did), the sites' refusals, the
reused arms and the machine.
"""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from fedmed.config import FederationConfig
from fedmed.evaluation.dp_outlook import NOISE_TO_SIGNAL_LIMIT, outlook_markdown
from fedmed.evaluation.verdict import MIN_TEST_CASES


def fmt(v: float | None, digits: int = 3) -> str:
    """A number for a table cell; ``-`` for ``None`` / NaN."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any], float | None]]:
    """``(approach, headline, ratio to centralized)`` per row of the headline table."""
    central = result["centralized"]["dice_mean"]
    out: list[tuple[str, dict[str, Any], float | None]] = [
        ("centralized", result["centralized"], 1.0)
    ]
    for site, r in result["local"].items():
        out.append((f"local-only {site}", r, r["dice_mean"] / central if central else None))
    for name, r in result["federated"].items():
        out.append((f"federated {name}", r, result["ratio_federated_to_centralized"][name]))
    return out


def _columns(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    classes = list(result["centralized"]["dice_per_class"])
    unseen = list(result["centralized"].get("unseen") or {})
    return classes, unseen


def _cells(r: dict[str, Any], ratio: float | None, classes: list[str], unseen: list[str]
           ) -> list[str]:
    return [
        fmt(r["dice_mean"]),
        *[fmt(r["dice_per_class"].get(c)) for c in classes],
        fmt(r["hd95_mean"], 1),
        fmt(ratio),
        *[fmt((r.get("unseen") or {}).get(u, {}).get("dice_mean")) for u in unseen],
    ]


def comparison_table(result: dict[str, Any]) -> Table:
    """The headline table for the terminal."""
    classes, unseen = _columns(result)
    table = Table(title="federated vs centralized vs local-only (central test set)")
    for col in ["approach", "Dice", *classes, "HD95", "x centralized",
                *[f"unseen {u}" for u in unseen]]:
        table.add_column(
            col, justify="left" if col == "approach" else "right", no_wrap=col == "approach"
        )
    for name, r, ratio in rows(result):
        table.add_row(name, *_cells(r, ratio, classes, unseen))
    return table


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(cells) + " |" for cells in body]]


def headline_section(result: dict[str, Any], cfg: FederationConfig) -> list[str]:
    """Title, compute rule and the central-test-set table."""
    classes, unseen = _columns(result)
    head = ["approach", "Dice", *classes, "HD95 (mm)", "x centralized",
            *[f"unseen {u}" for u in unseen], "wall s"]
    body = [[name, *_cells(r, ratio, classes, unseen), fmt(r.get("wall_seconds"), 0)]
            for name, r, ratio in rows(result)]
    return [
        f"# Federated vs centralized: {cfg.name}", "",
        f"Compute rule: {result['compute_rule']}.", "",
        "Dice on the central test set (foreground classes; `Dice` is their mean), the ratio to "
        "the centralized baseline, and Dice on each unseen-scanner site.", "",
        *_md_table(head, body),
        "", f"Mean of local-only Dice: {fmt(result['local_mean_dice'])}.", "",
    ]


def per_site_section(result: dict[str, Any], cfg: FederationConfig) -> list[str]:
    """Every approach's Dice on each site's own test cases."""
    body = [[name, *[fmt((r.get("per_site") or {}).get(s, {}).get("dice_mean"))
                     for s in cfg.site_names]] for name, r, _ in rows(result)]
    return ["## Per-site test cases", "", *_md_table(["approach", *cfg.site_names], body), ""]


def _ci(entry: dict[str, Any] | None) -> str:
    """``0.862 [0.841, 0.880]``; the bare value without bounds; ``-`` without a value."""
    if not entry or entry.get("dice") is None:
        return "-"
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return fmt(entry["dice"])
    return f"{fmt(entry['dice'])} [{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}]"


def _signed(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("dice") is None:
        return "-"
    text = f"{entry['dice']:+.3f}"
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{entry['ci_low']:+.3f}, {entry['ci_high']:+.3f}]"
    return text


def _verdict_sentence(site: str, v: dict[str, Any]) -> str:
    """One site's verdict in words."""
    n = v["test_cases"]
    fed_run = v.get("federated_run") or "federated"
    parts = [f"alone {_ci(v['local'])}"]
    if v["federated"] is not None:
        parts.append(f"global {fed_run} model {_ci(v['federated'])}")
    if v["personalised"] is not None:
        parts.append(f"personalised ({v.get('personalised_run')}) {_ci(v['personalised'])}")
    text = f"- **{site} {v['verdict']}**: on its {n} own test cases, " + ", ".join(parts)
    if v.get("compared") is not None:
        text += f"; {v['compared']} - alone = {_signed(v['difference'])} ({v['rule']})"
    text += "."
    if v["too_few_cases"]:
        text += (f" Only {n} test case{'s' if n != 1 else ''} (fewer than {MIN_TEST_CASES}): "
                 "the interval means little.")
    return text


def verdict_section(result: dict[str, Any]) -> list[str]:
    """The per-site verdicts: table, one sentence per site, figure."""
    verdicts: dict[str, dict[str, Any]] = result.get("per_site_verdict") or {}
    if not verdicts:
        return []
    basis = next(iter(verdicts.values())).get("federated_run") or "-"
    head = ["hospital", "test cases", "alone", f"federated ({basis})", "personalised",
            "better - alone", "verdict"]
    body = [[site, str(v["test_cases"]), _ci(v["local"]), _ci(v["federated"]),
             _ci(v["personalised"]), _signed(v["difference"]), f"**{v['verdict']}**"]
            for site, v in verdicts.items()]
    return [
        "## Does each hospital gain by joining?", "",
        "On each hospital's own test cases: Dice of the model it trains alone, of the global "
        "federated model and of its personalised model (evaluated by the site itself, when "
        "the federation personalised), with bootstrap 95% intervals over its test cases. The "
        "verdict compares the better of the federated and personalised models with the "
        "model trained alone: a paired bootstrap of the per-case difference when both were "
        "evaluated case by case, else non-overlapping intervals of the site's aggregates.", "",
        *_md_table(head, body), "",
        *[_verdict_sentence(site, v) for site, v in verdicts.items()], "",
        "![per-site verdict](per_site_verdict.png)", "",
    ]


def _dp_reading(result: dict[str, Any], outlook: dict[str, Any]) -> list[str]:
    """Why DP cost what it did, in words."""
    ratios = [r["noise_to_signal"] for r in outlook["sites"].values()
              if r["noise_to_signal"] is not None]
    text = (
        "Why: at every DP step each patient's gradient is clipped to norm C and Gaussian "
        "noise of norm about sigma * C * sqrt(d) is added to their sum, which is at most "
        "B * C; noise/signal says how many times the noise outweighs the largest possible "
        "signal. fedmed's DP benchmark (docs/privacy.md) learned at about 4 (0.80x non-DP, "
        "480 patients per site) and reached 0.64x at about 20 (120 patients per site); "
        f"above {NOISE_TO_SIGNAL_LIMIT:.0f}, expect DP to learn little."
    )
    if ratios:
        low, high = f"{min(ratios):.0f}", f"{max(ratios):.0f}"
        text += f" Here noise/signal is {low if low == high else f'{low} to {high}'}."
    fed = result["federated"]
    dp_runs = [n for n, r in fed.items() if r.get("epsilon")]
    for name in dp_runs:
        plain = fed.get(name.removesuffix("-dp"))
        if plain and plain["dice_mean"] and fed[name]["dice_mean"] is not None:
            text += (f" {name} reached Dice {fmt(fed[name]['dice_mean'])}, "
                     f"{fed[name]['dice_mean'] / plain['dice_mean']:.2f}x "
                     f"{name.removesuffix('-dp')} without DP ({fmt(plain['dice_mean'])}).")
    return [text]


def dp_section(result: dict[str, Any], cfg: FederationConfig) -> list[str]:
    """Epsilon per site of each DP run, the DP outlook and why DP cost what it did."""
    eps_rows = [(n, r["epsilon"]) for n, r in result["federated"].items() if r.get("epsilon")]
    outlook = result.get("dp_outlook")
    if not eps_rows and not outlook:
        return []
    lines = ["## Differential privacy (patient level)", ""]
    if eps_rows:
        body = [[n, fmt(result["federated"][n]["dice_mean"]),
                 *[fmt(eps.get(s), 2) for s in cfg.site_names]] for n, eps in eps_rows]
        lines += [*_md_table(["run", "Dice", *[f"epsilon {s}" for s in cfg.site_names]], body),
                  "", f"delta = {cfg.privacy.delta:g}", ""]
    if outlook:
        lines += ["### What each cohort means for DP", "", *outlook_markdown(outlook), "",
                  *_dp_reading(result, outlook), ""]
    return lines


def refusals_section(result: dict[str, Any]) -> list[str]:
    """Requests the sites refused under their policies, by reason code.

    ``sites_refused`` (site -> code -> requests, over the rounds) and
    ``sites_refused_final`` (site -> code, the final personalisation round).
    """
    body: list[list[str]] = []
    for n, r in result["federated"].items():
        body += [[n, site, code, str(count)] for site, codes in
                 (r.get("sites_refused") or {}).items() for code, count in codes.items()]
        body += [[n, site, f"{code} (final round)", "1"]
                 for site, code in (r.get("sites_refused_final") or {}).items()]
    if not body:
        return []
    return ["## Requests the sites refused (their policies)", "",
            *_md_table(["run", "site", "reason code", "requests"], body), ""]


def reused_section(result: dict[str, Any]) -> list[str]:
    """The arms taken from an earlier ``fedmed compare`` in the same folder."""
    if not result.get("reused"):
        return []
    return [
        "## Reused runs", "",
        "Reused from an earlier `fedmed compare` in this folder (unchanged config, data and "
        "fedmed version; their wall times are the original runs'): "
        + ", ".join(result["reused"]) + ". `fedmed compare --rerun` retrains them.", "",
    ]


def machine_section(result: dict[str, Any]) -> list[str]:
    """The machine, the wall time and the Dice-per-round plot."""
    m = result["machine"]
    return [
        "## Machine", "",
        f"{m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"total wall time {result['wall_seconds']:.0f} s.", "",
        "![central Dice per round](dice_per_round.png)", "",
    ]


def render_report(result: dict[str, Any], cfg: FederationConfig) -> str:
    """``report.md``: every section, in the order a reader needs them."""
    return "\n".join([
        *headline_section(result, cfg),
        *per_site_section(result, cfg),
        *verdict_section(result),
        *dp_section(result, cfg),
        *refusals_section(result),
        *reused_section(result),
        *machine_section(result),
    ])


def verdict_table(result: dict[str, Any]) -> Table:
    """The per-site verdicts for the terminal."""
    verdicts: dict[str, dict[str, Any]] = result["per_site_verdict"]
    basis = next(iter(verdicts.values())).get("federated_run") or "-"
    table = Table(title="does each hospital gain by joining? (its own test cases, 95% intervals)")
    for col in ["hospital", "cases", "alone", f"federated ({basis})", "personalised",
                "better - alone", "verdict"]:
        table.add_column(col, justify="left" if col in ("hospital", "verdict") else "right")
    for site, v in verdicts.items():
        cases = f"{v['test_cases']}" + (" (few)" if v["too_few_cases"] else "")
        table.add_row(site, cases, _ci(v["local"]), _ci(v["federated"]),
                      _ci(v["personalised"]), _signed(v["difference"]), v["verdict"])
    return table
