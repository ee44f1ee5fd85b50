"""Patient-level DP-SGD in the local trainer: accounting, budget, sampling, weights, learning."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedmed.config import FederationConfig
from fedmed.data.preprocess import PreprocessedCase
from fedmed.errors import PrivacyError
from fedmed.models import build_model
from fedmed.training.dp_loader import PatientPatches, PoissonSteps
from fedmed.training.ledger import PrivacyLedger, ledger_path
from fedmed.training.loop import build_loss
from fedmed.training.trainer import LocalTrainer

DELTA = 1e-5
SITE = "site-a"


def _cases(n: int, seed: int = 0) -> list[PreprocessedCase]:
    """Bright noisy balls on a dark background, labelled: an easy segmentation task."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    out = []
    for i in range(n):
        centre = rng.uniform(7, 13, 3)
        label = (((grid - centre[:, None, None, None]) ** 2).sum(0) < 25).astype(np.uint8)
        image = (2.0 * label - 1 + rng.normal(0, 0.3, label.shape)).astype(np.float32)
        out.append(PreprocessedCase(f"case{i}", image[None], label[None], np.ones(1, bool),
                                    np.eye(4)))
    return out


def _cfg(
    tmp_path: Path, training: dict[str, Any] | None = None, **privacy: Any
) -> FederationConfig:
    return FederationConfig(
        modalities=("T1",), labels={0: "background", 1: "ball"},
        sites=({"name": SITE, "path": str(tmp_path)},),
        preprocessing={"patch_size": (16, 16, 16), "patches_per_case": 2, "augment": False},
        model={"channels": (4, 8), "num_res_units": 1, "norm": "instance"},
        training={"device": "cpu", "progress": False, "learning_rate": 1e-2,
                  "schedule": "constant", **(training or {})},
        privacy={"enabled": True, "delta": DELTA, "max_grad_norm": 1.0, **privacy},
    )


def _trainer(cfg: FederationConfig, tmp_path: Path, seed: int = 0) -> LocalTrainer:
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
    return LocalTrainer(cfg, model, device="cpu", site=SITE, state_dir=tmp_path / "state",
                        run_id="run-1", metrics_path=tmp_path / "metrics.jsonl")


@functools.lru_cache
def _rdp(sigma: float, q: float, steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=DELTA))


def test_epsilon_composes_over_rounds_and_restarts(tmp_path: Path) -> None:
    # 8 patients, 2 expected per step: q = 0.25, 4 steps per epoch
    cfg = _cfg(tmp_path, noise_multiplier=1.0, expected_batch_size=2, target_epsilon=None)
    cases = _cases(8)
    trainer = _trainer(cfg, tmp_path)
    results = [
        trainer.fit(cases, 1, round_index=r, start_epoch=r - 1, total_epochs=4) for r in (1, 2)
    ]
    assert [r.steps for r in results] == [4, 4]
    for r, res in enumerate(results, start=1):
        assert res.skipped is None and res.delta == DELTA and res.num_cases == 8
        assert res.epsilon == pytest.approx(_rdp(1.0, 0.25, 4 * r), rel=0.01)
    # a restarted client (new trainer, new model, same state folder) continues the count
    restarted = _trainer(cfg, tmp_path, seed=1)
    res3 = restarted.fit(cases, 1, round_index=3, start_epoch=2, total_epochs=4)
    ledger = PrivacyLedger.load(ledger_path(tmp_path / "state", "run-1", SITE))
    assert ledger.history == [(1.0, 0.25, 4)] * 3
    assert ledger.epsilon() == _rdp(1.0, 0.25, 12)  # recomputation: exact
    assert res3.epsilon == pytest.approx(_rdp(1.0, 0.25, 12), rel=0.01)
    logged = [e.epsilon for e in ledger.entries]
    assert logged == pytest.approx([_rdp(1.0, 0.25, 4 * r) for r in (1, 2, 3)], rel=0.01)
    assert results[0].epsilon < results[1].epsilon < res3.epsilon
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["round_index"] for x in lines] == [1, 2, 3]
    assert all(x["noise_multiplier"] == 1.0 and x["sample_rate"] == 0.25 for x in lines)


def test_budget_exhaustion_stops_the_site(tmp_path: Path) -> None:
    one, two = _rdp(1.0, 0.5, 2), _rdp(1.0, 0.5, 4)
    cfg = _cfg(tmp_path, noise_multiplier=1.0, expected_batch_size=2, max_epsilon=(one + two) / 2)
    cases = _cases(4)
    trainer = _trainer(cfg, tmp_path)
    initial = trainer.get_weights()
    first = trainer.fit(cases, 1, round_index=1)
    assert first.skipped is None and first.steps == 2
    after_first = trainer.get_weights()
    # DP weights leave the site under the plain model's names and load into a plain model
    assert set(after_first) == set(initial)
    assert not any("_module" in k for k in after_first)
    assert not isinstance(trainer.model, __import__("opacus").GradSampleModule)
    plain = build_model(cfg.model, 1, 2)
    plain.load_state_dict(after_first, strict=True)
    assert any(not torch.equal(initial[k], after_first[k]) for k in initial)

    second = trainer.fit(cases, 1, round_index=2)
    assert second.skipped is not None and second.skipped.startswith("privacy budget exhausted")
    assert f"{two:.3f}" in second.skipped
    assert second.steps == 0 and second.num_cases == 0
    assert second.epsilon == pytest.approx(one, rel=1e-12)
    after_second = trainer.get_weights()
    assert all(torch.equal(after_first[k], after_second[k]) for k in after_first)
    ledger = PrivacyLedger.load(ledger_path(tmp_path / "state", "run-1", SITE))
    assert len(ledger.entries) == 1 and ledger.skips[0]["round"] == 2


def test_noise_from_target_epsilon_stays_within_target(tmp_path: Path) -> None:
    target = 4.0
    # q = 1 (every patient every step) keeps Opacus' sigma search fast; 1 step per epoch
    cfg = _cfg(tmp_path, target_epsilon=target, expected_batch_size=4)
    cases = _cases(4)
    trainer = _trainer(cfg, tmp_path)
    res = [trainer.fit(cases, 1, round_index=r, start_epoch=r - 1, total_epochs=3)
           for r in (1, 2, 3)]
    assert all(r.skipped is None for r in res)
    ledger = PrivacyLedger.load(ledger_path(tmp_path / "state", "run-1", SITE))
    sigmas = {e.noise_multiplier for e in ledger.entries}
    assert len(sigmas) == 1  # planned once, reused by every round
    assert ledger.plan is not None and ledger.plan["planned_steps"] == 3
    # the planned run ends just under the target (Opacus' search tolerance is 0.01)
    assert target - 0.05 < res[-1].epsilon <= target
    assert res[-1].epsilon == _rdp(sigmas.pop(), 1.0, 3)
    # one round beyond the plan would exceed max_epsilon (= target_epsilon by default)
    extra = trainer.fit(cases, 1, round_index=4, start_epoch=3, total_epochs=3)
    assert extra.skipped is not None and extra.epsilon == res[-1].epsilon


def test_poisson_sampler_takes_each_patient_at_most_once_per_step() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = PoissonSteps(10, 0.3, 3000, gen)
    sampler.set_epoch(2)
    tagged = list(sampler)
    assert len(tagged) == len(sampler) == 3000
    # every index carries its global step (epoch * steps + k): it seeds the patient's patch
    assert all(step == 6000 + k for k, b in enumerate(tagged) for step, _ in b)
    batches = [[case for _, case in b] for b in tagged]
    assert all(len(b) == len(set(b)) for b in batches)
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 3.0) < 0.15  # E|batch| = q * n
    assert (sizes == 0).sum() > 50  # P(empty) = 0.7^10 ~ 2.8%: empty steps do happen


def test_dp_step_uses_one_patch_per_sampled_patient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # patches_per_case = 2 and q = 1/8: without the DP loader a case would appear twice
    cfg = _cfg(tmp_path, noise_multiplier=1.0, expected_batch_size=1, target_epsilon=None)
    cases = _cases(8)
    trainer = _trainer(cfg, tmp_path)
    fetched: list[tuple[int, int]] = []
    original = PatientPatches.__getitem__

    def recording(self: PatientPatches, key: tuple[int, int]) -> dict[str, Any]:
        fetched.append(key)
        return original(self, key)

    monkeypatch.setattr(PatientPatches, "__getitem__", recording)
    res = trainer.fit(cases, 3)
    assert res.steps == 24  # 3 epochs x ceil(1 / q) steps, empty ones included
    seen: dict[int, list[int]] = {}
    for step, case in fetched:
        seen.setdefault(step, []).append(case)
    assert set(seen) <= set(range(24))
    assert all(len(s) == len(set(s)) for s in seen.values())  # one patch per patient a step
    assert all(0 <= c < 8 for s in seen.values() for c in s)
    # P(no empty batch in 24 steps) = (1 - 0.875^8)^24 < 1e-4; empty steps counted above
    assert len(seen) < 24
    ledger = PrivacyLedger.load(ledger_path(tmp_path / "state", "run-1", SITE))
    assert ledger.history == [(1.0, 0.125, 24)]


def test_dp_training_reduces_loss(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, noise_multiplier=0.5, expected_batch_size=8, target_epsilon=None)
    cases = _cases(8)
    trainer = _trainer(cfg, tmp_path)
    loss_fn = build_loss(cfg.training.loss, trainer.device, per_sample=True)
    fixed = trainer.patch_dataset(cases, seed=0, train=False)
    batch = torch.utils.data.default_collate([fixed[2 * i] for i in range(8)])

    def loss() -> float:
        with torch.no_grad():
            return float(loss_fn(trainer.model(batch["image"], batch["available"]),
                                 batch["label"]))

    before = loss()
    res = trainer.fit(cases, 10)
    assert res.steps == 10 and np.isfinite(res.loss)
    assert loss() < 0.8 * before


def test_weight_averaging_returns_the_moving_average_of_the_iterates(tmp_path: Path) -> None:
    decay = 0.6
    cfg = _cfg(tmp_path, noise_multiplier=1.0, expected_batch_size=4, target_epsilon=None,
               weight_averaging=decay)
    trainer = _trainer(cfg, tmp_path)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    iterates: list[list[torch.Tensor]] = []

    class Recording(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            out = super().step(closure)
            iterates.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
            return out

    trainer.make_optimizer = lambda params: Recording(params, lr=0.05)  # type: ignore[method-assign]
    res = trainer.fit(_cases(8), 3)
    assert res.steps == len(iterates) == 6
    expected = start
    for it in iterates:
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, it, strict=True)]
    final = [p.detach() for p in trainer.model.parameters()]
    for f, e in zip(final, expected, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-6)
    # the average, not the last iterate, is what the site keeps and sends
    assert any(not torch.allclose(f, last) for f, last in zip(final, iterates[-1], strict=True))


def test_fedprox_term_pulls_towards_reference(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"optimizer": "sgd", "momentum": 0.5, "learning_rate": 0.05},
               noise_multiplier=2.0, expected_batch_size=4, target_epsilon=None)
    cases = _cases(4)
    distances = []
    for i, mu in enumerate((0.0, 10.0)):
        (tmp_path / str(i)).mkdir()
        trainer = _trainer(cfg, tmp_path / str(i))
        ref = trainer.get_weights()
        trainer.fit(cases, 8, reference=ref, mu=mu)
        w = trainer.get_weights()
        distances.append(sum(float((w[k] - ref[k]).pow(2).sum()) for k in ref))
    assert distances[1] < 0.5 * distances[0]


@pytest.mark.skipif(importlib.util.find_spec("torchcsprng") is not None,
                    reason="torchcsprng is installed")
def test_secure_rng_without_torchcsprng_explains(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, noise_multiplier=1.0, secure_rng=True, target_epsilon=None)
    trainer = _trainer(cfg, tmp_path)
    with pytest.raises(PrivacyError, match="torchcsprng"):
        trainer.fit(_cases(2), 1)


_CHILD = """
import sys, json
from pathlib import Path
import numpy as np, torch
from fedmed.config import FederationConfig
from fedmed.data.preprocess import PreprocessedCase
from fedmed.models import build_model
from fedmed.training.trainer import LocalTrainer

root, rounds, last_epochs = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
cfg = FederationConfig.model_validate_json((root / "cfg.json").read_text())
data = np.load(root / "cases.npz")
cases = [PreprocessedCase(f"case{i}", data["images"][i], data["labels"][i], np.ones(1, bool),
                          np.eye(4)) for i in range(len(data["images"]))]
torch.manual_seed(0)
model = build_model(cfg.model, len(cfg.modalities), cfg.num_classes)
trainer = LocalTrainer(cfg, model, device="cpu", site="site-a", state_dir=root / "state",
                       run_id="run-1")
for k, r in enumerate(rounds):
    epochs = last_epochs if k == len(rounds) - 1 else 1
    res = trainer.fit(cases, epochs, round_index=r, start_epoch=r - 1, total_epochs=1000)
    print(f"round {r} epsilon {res.epsilon}", flush=True)
"""


def test_killed_client_process_resumes_its_epsilon(tmp_path: Path) -> None:
    """A site process SIGKILLed in the middle of round 2 and started again continues from
    round 1's epsilon: the unfinished round released nothing and is not counted."""
    import signal
    import subprocess
    import sys
    import time

    cfg = _cfg(tmp_path, noise_multiplier=1.0, expected_batch_size=2, target_epsilon=None)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    cases = _cases(8)
    np.savez(tmp_path / "cases.npz", images=np.stack([c.image for c in cases]),
             labels=np.stack([c.label for c in cases]))
    script = tmp_path / "site.py"
    script.write_text(_CHILD)
    path = ledger_path(tmp_path / "state", "run-1", SITE)

    # rounds 1 and 2, where round 2 is far too long to finish: killed once it has started
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "[1, 2]", "100000"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("round 1 epsilon"), line
        time.sleep(2.0)  # well inside round 2's DP steps
        assert proc.poll() is None, "round 2 ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    after_kill = PrivacyLedger.load(path)
    assert after_kill.history == [(1.0, 0.25, 4)]
    assert after_kill.epsilon() == pytest.approx(_rdp(1.0, 0.25, 4), rel=1e-9)

    # the restarted process runs round 2 again and continues the count from round 1
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "[2]", "1"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    reported = float(done.stdout.split("epsilon")[-1])
    resumed = PrivacyLedger.load(path)
    assert resumed.history == [(1.0, 0.25, 4)] * 2
    assert reported == pytest.approx(_rdp(1.0, 0.25, 8), rel=0.01)
    assert resumed.epsilon() == _rdp(1.0, 0.25, 8)
