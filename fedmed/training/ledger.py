"""The privacy ledger: each site's DP-SGD composition, on disk, across rounds and restarts.

A site's ledgers live in its state folder under ``privacy/<dataset>/``
(:func:`dataset_ledger_dir`), one ``ledger-<run_id>-<site>.json`` per run; each holds
the explicit composition of every DP fit of the run: one entry per fit with its round,
steps, Poisson sampling rate, noise multiplier and the epsilon after it. Epsilon is never
carried over as a number: it is recomputed from that history by a fresh Opacus accountant
(RDP by default, PRV on request), so a restarted client continues the count exactly, and
anyone can re-derive the figure from the file alone.

The file is rewritten atomically (temporary file, ``fsync``, ``os.replace``) after every
fit, so a crash leaves either the old or the new ledger, never a torn one.

The **lifetime** budget of a dataset composes every run's ledger in that folder
(:func:`lifetime_epsilon`): it is keyed by the dataset, not by a run name, so a new run
name starts a new per-run ledger but continues the dataset's lifetime ε.

Example::

    ledger = PrivacyLedger.open(state_dir, run_id="run-1", site="hospital-a",
                                accountant="rdp", delta=1e-5)
    ledger.epsilon_if([(1.1, 0.25, 8)])   # what the next fit would cost
    ledger.record(round_index=1, steps=8, sample_rate=0.25, noise_multiplier=1.1)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmed.errors import PrivacyError

LEDGER_FORMAT = "fedmed-privacy-ledger"
LEDGER_VERSION = 1
STATE_DIR_NAME = ".fedmed-state"
"""Default state directory (under the current folder) when a trainer is given none."""
ACCOUNTANTS = ("rdp", "prv")

HistoryItem = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: Opacus' accountant history format."""


def default_state_dir(state_dir: Path | None) -> Path:
    """``state_dir``, or ``./.fedmed-state`` when none was configured.

    The default is deliberately persistent (never a temporary folder): a ledger that
    vanished on reboot would silently reset a site's privacy budget.
    """
    return Path(state_dir) if state_dir is not None else Path.cwd() / STATE_DIR_NAME


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``_ . -`` replaced by ``_``."""
    # run ids may come from users or timestamps; keep file names portable
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def ledger_path(state_dir: Path, run_id: str, site: str | None) -> Path:
    """``<state_dir>/ledger-<run_id>-<site>.json`` (unsafe characters replaced by ``_``)."""
    return Path(state_dir) / f"ledger-{safe_name(run_id)}-{safe_name(site or 'local')}.json"


def merge_history(history: Iterable[HistoryItem]) -> list[HistoryItem]:
    """Compose identical mechanisms into one item: ``(s, q, a) + (s, q, b) = (s, q, a + b)``.

    Composition is commutative, so this changes no guarantee; it makes the PRV
    accountant's discretisation identical to that of a single planned run (the RDP result
    is the same either way) and keeps the computation short for long runs.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(s, q, n) for (s, q), n in merged.items()]


def make_accountant(kind: str) -> Any:
    """A fresh Opacus accountant (``rdp`` or ``prv``).

    Raises:
        PrivacyError: an unknown accountant name.
    """
    if kind not in ACCOUNTANTS:
        raise PrivacyError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {kind!r}")
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


def compute_epsilon(history: Sequence[HistoryItem], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition ``history`` at ``delta``, by a fresh Opacus accountant.

    Args:
        history: ``[(noise_multiplier, sample_rate, steps), ...]``.
        delta: the target delta.
        accountant: ``rdp`` or ``prv``.

    Returns:
        Epsilon (0.0 for an empty history).
    """
    items = merge_history(history)
    if not items:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = items
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class LedgerEntry:
    """One DP fit of a site.

    Attributes:
        round: federated round (``None`` outside a federation).
        steps: DP-SGD steps taken (Poisson batches, empty ones included).
        sample_rate: Poisson sampling rate of patients per step.
        noise_multiplier: sigma (noise std / clipping norm).
        epsilon: the site's total epsilon after this fit, at the ledger's delta.
        epochs: local epochs of the fit (``steps = epochs * ceil(1 / sample_rate)``).
        num_cases: patients the site trained on.
        max_grad_norm: per-patient clipping norm.
        time: UTC time the entry was written (ISO 8601).
    """

    round: int | None
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    epochs: int = 0
    num_cases: int = 0
    max_grad_norm: float = 0.0
    time: str = ""


@dataclass
class PrivacyLedger:
    """A site's privacy composition for one run, stored at :attr:`path`.

    Attributes:
        path: the JSON file.
        run_id: the federated run.
        site: the site.
        accountant: ``rdp`` or ``prv``.
        delta: the delta every epsilon refers to.
        entries: one per DP fit, in order.
        plan: the noise plan computed from a target epsilon (reused so that every round of a
            run uses the same sigma), or ``None``.
        skips: rounds the site refused to train, with the reason.
    """

    path: Path
    run_id: str
    site: str | None
    accountant: str = "rdp"
    delta: float = 1e-5
    entries: list[LedgerEntry] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    skips: list[dict[str, Any]] = field(default_factory=list)
    _memo: dict[tuple[HistoryItem, ...], float] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    # -- opening and saving ----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        state_dir: Path | None,
        run_id: str,
        site: str | None,
        *,
        accountant: str = "rdp",
        delta: float = 1e-5,
    ) -> PrivacyLedger:
        """The site's ledger for ``run_id``: read from disk if present, else a new empty one.

        Raises:
            PrivacyError: the existing file is unreadable, or was written with another
                accountant or delta (epsilons at different deltas must not be mixed).
        """
        make_accountant(accountant)  # validates the name early
        path = ledger_path(default_state_dir(state_dir), run_id, site)
        if not path.exists():
            return cls(path=path, run_id=run_id, site=site, accountant=accountant, delta=delta)
        ledger = cls.load(path)
        if ledger.accountant != accountant or ledger.delta != delta:
            raise PrivacyError(
                f"privacy ledger {path} was recorded with accountant={ledger.accountant!r}, "
                f"delta={ledger.delta}, but the config now asks for accountant={accountant!r}, "
                f"delta={delta}; keep the run's privacy settings, or start a new run id"
            )
        return ledger

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        """Read a ledger file.

        Raises:
            PrivacyError: missing, not JSON, or not a fedmed ledger.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PrivacyError(f"privacy ledger {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise PrivacyError(
                f"privacy ledger {path} cannot be read as JSON ({exc}); restore it from a "
                "backup -- deleting it would reset the site's privacy budget"
            ) from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise PrivacyError(
                f"{path} is not a fedmed privacy ledger (expected format {LEDGER_FORMAT!r})"
            )
        try:
            entries = [LedgerEntry(**e) for e in data.get("entries", [])]
            return cls(
                path=path,
                run_id=str(data["run_id"]),
                site=data.get("site"),
                accountant=str(data.get("accountant", "rdp")),
                delta=float(data["delta"]),
                entries=entries,
                plan=data.get("plan"),
                skips=list(data.get("skips", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(f"privacy ledger {path} is malformed: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the file holds, plus the recomputed epsilon)."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "run_id": self.run_id,
            "site": self.site,
            "accountant": self.accountant,
            "delta": self.delta,
            "epsilon": self.epsilon(),
            "total_steps": self.total_steps,
            "history": [list(h) for h in self.history],
            "plan": self.plan,
            "entries": [asdict(e) for e in self.entries],
            "skips": self.skips,
        }

    def save(self) -> None:
        """Write the ledger atomically (a crash leaves the old or the new file, never half)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- accounting ------------------------------------------------------------------------

    @property
    def history(self) -> list[HistoryItem]:
        """The composition so far, ``[(noise_multiplier, sample_rate, steps)]`` per fit."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    @property
    def total_steps(self) -> int:
        """DP-SGD steps over all fits."""
        return sum(e.steps for e in self.entries)

    def epsilon(self) -> float:
        """Epsilon spent so far at :attr:`delta`, recomputed from the history."""
        return self.epsilon_if([])

    def epsilon_if(self, more: Sequence[HistoryItem]) -> float:
        """Epsilon the site would have spent after also running ``more``."""
        # memoised per composition: a fit asks for the same figure several times and an
        # accountant call costs ~0.1-1 s
        key = tuple(sorted(merge_history([*self.history, *more])))
        if key not in self._memo:
            self._memo[key] = compute_epsilon(key, self.delta, self.accountant)
        return self._memo[key]

    def record(
        self,
        *,
        round_index: int | None,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        epochs: int = 0,
        num_cases: int = 0,
        max_grad_norm: float = 0.0,
        save: bool = True,
    ) -> LedgerEntry:
        """Append one fit, recompute epsilon, and (by default) write the file.

        Returns:
            The new entry (its ``epsilon`` is the site's total after the fit).
        """
        eps = self.epsilon_if([(noise_multiplier, sample_rate, steps)])
        entry = LedgerEntry(
            round=round_index,
            steps=int(steps),
            sample_rate=float(sample_rate),
            noise_multiplier=float(noise_multiplier),
            epsilon=eps,
            epochs=int(epochs),
            num_cases=int(num_cases),
            max_grad_norm=float(max_grad_norm),
            time=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.entries.append(entry)
        if save:
            self.save()
        return entry

    def record_skip(self, round_index: int | None, reason: str) -> None:
        """Note that the site refused a round (written immediately)."""
        self.skips.append(
            {
                "round": round_index,
                "reason": reason,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        self.save()


PRIVACY_DIR = "privacy"


def dataset_ledger_dir(state_dir: Path, dataset_id: str) -> Path:
    """``<state_dir>/privacy/<dataset_id>``: the ledgers of every run on one dataset."""
    return Path(state_dir) / PRIVACY_DIR / safe_name(dataset_id)


def lifetime_history(folder: Path) -> list[HistoryItem]:
    """The composition of every run's ledger in a dataset's ledger folder.

    Raises:
        PrivacyError: a ledger there is unreadable (never skipped: that would reset ε).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [h for p in sorted(folder.glob("ledger-*.json")) for h in PrivacyLedger.load(p).history]


def lifetime_epsilon(
    folder: Path, delta: float, more: Sequence[HistoryItem] = (), accountant: str = "rdp"
) -> float:
    """ε of a dataset over every run so far (and ``more``), at ``delta``."""
    return compute_epsilon([*lifetime_history(folder), *more], delta, accountant)


def lifetime_report(state_dir: Path) -> list[dict[str, Any]]:
    """Every dataset's lifetime ε in a site's state folder, and each run's share.

    Returns:
        One dict per dataset: ``dataset``, ``delta`` and ``epsilon`` (the lifetime
        composition at the smallest δ any run used), ``steps``, and ``runs`` (``run_id``,
        ``site``, ``epsilon`` of that run alone, ``steps``), oldest ledger first.

    Raises:
        PrivacyError: no ``privacy/`` folder there, or an unreadable ledger.
    """
    root = Path(state_dir) / PRIVACY_DIR
    if not root.is_dir():
        raise PrivacyError(
            f"{state_dir} holds no privacy ledgers ({root} does not exist); give the site's "
            "state folder (the SuperNode's state-dir, or <site>/.fedmed-state in simulation)"
        )
    out = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        ledgers = [PrivacyLedger.load(p) for p in sorted(folder.glob("ledger-*.json"))]
        if not ledgers:
            continue
        ledgers.sort(key=lambda led: min((e.time for e in led.entries), default=""))
        delta = min(led.delta for led in ledgers)
        out.append({
            "dataset": folder.name, "delta": delta,
            "epsilon": lifetime_epsilon(folder, delta),
            "steps": sum(led.total_steps for led in ledgers),
            "runs": [{"run_id": led.run_id, "site": led.site, "epsilon": led.epsilon(),
                      "steps": led.total_steps} for led in ledgers],
        })
    return out


def find_ledgers(folder: Path) -> list[Path]:
    """Every ``ledger-*.json`` under ``folder`` (recursively), sorted.

    Raises:
        PrivacyError: ``folder`` does not exist.
    """
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise PrivacyError(
            f"{folder} does not exist; give a run folder or a site state folder that holds "
            "ledger-<run>-<site>.json files"
        )
    return sorted(p for p in folder.rglob("ledger-*.json") if p.is_file())
