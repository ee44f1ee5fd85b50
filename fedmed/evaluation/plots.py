"""The figures of ``fedmed compare``: Dice per round, and the per-site verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BARS = (("local", "alone", "#9e9e9e"), ("federated", "federated", "#1f77b4"),
        ("personalised", "personalised", "#2ca02c"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_dice_per_round(out: Path, result: dict[str, Any]) -> Path:
    """``dice_per_round.png``: central Dice per round per strategy, with reference lines."""
    from matplotlib.ticker import MaxNLocator

    from fedmed.federation.rundir import RunDir

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in result["federated"]:
        lines = [m for m in RunDir(out / f"federated-{name}").metrics() if "central_dice" in m]
        ax.plot(
            [m["round"] for m in lines], [m["central_dice"] for m in lines], marker="o", label=name
        )
    central = result["centralized"]["dice_mean"]
    if central is not None:
        ax.axhline(central, color="black", linestyle="--", label=f"centralized ({central:.3f})")
    locals_ = {s: r["dice_mean"] for s, r in result["local"].items() if r["dice_mean"] is not None}
    if locals_:
        best = max(locals_, key=lambda s: locals_[s])
        ax.axhline(locals_[best], color="grey", linestyle=":",
                   label=f"best local-only {best} ({locals_[best]:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("Dice, central test set (mean over foreground classes)")
    ax.set_title("Federated training: central Dice per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "dice_per_round.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _error(entry: dict[str, Any]) -> tuple[float, float]:
    """Distances from the value down to ``ci_low`` and up to ``ci_high`` (0 without them)."""
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return 0.0, 0.0
    return max(0.0, entry["dice"] - entry["ci_low"]), max(0.0, entry["ci_high"] - entry["dice"])


def plot_per_site_verdict(out: Path, verdicts: dict[str, dict[str, Any]]) -> Path:
    """``per_site_verdict.png``: per site, Dice alone / federated / personalised.

    Their 95% intervals are the error bars; the verdict (and the number of test cases) is
    written above each site's group, in orange when the site has too few test cases.
    """
    plt = _pyplot()
    sites = list(verdicts)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(sites) + 2), 4.5))
    width = 0.26
    for k, (key, label, color) in enumerate(BARS):
        xs, ys, lo, hi = [], [], [], []
        for i, site in enumerate(sites):
            entry = verdicts[site].get(key)
            if entry and entry.get("dice") is not None:
                xs.append(i + (k - 1) * width)
                ys.append(entry["dice"])
                down, up = _error(entry)
                lo.append(down)
                hi.append(up)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=color, label=label)
    for i, site in enumerate(sites):
        v = verdicts[site]
        few = ", too few" if v["too_few_cases"] else ""
        note = f"{v['verdict']}\n(n={v['test_cases']}{few})"
        ax.text(i, 1.02, note, ha="center", va="bottom", fontsize=8,
                color="black" if not v["too_few_cases"] else "#b35900")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("Dice on the site's own test cases")
    ax.set_title("Does each hospital gain by joining? (bars: 95% bootstrap intervals)",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "per_site_verdict.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
