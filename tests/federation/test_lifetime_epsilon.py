"""A site's lifetime ε survives a killed process, a restart and a new run name.

A real site process trains DP rounds through :func:`fedmed.federation.site.train_site`; it
is SIGKILLed in the middle of a round, started again under another run name, and the
lifetime ledger of its dataset must hold exactly the finished rounds of both runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmed.config import load_config
from fedmed.training.ledger import compute_epsilon, lifetime_report
from tests.support.federations import make_federation
from tests.support.policies import write_policy

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SIGMA, DELTA = 1.0, 1e-5
Q, STEPS = 2 / 5, 3  # 8 cases: 5 train; 2 expected per step; ceil(1 / q) steps per epoch

_CHILD = """
import json, sys
import torch
from fedmed.config import load_config
from fedmed.federation.protocol import config_for_site, config_json
from fedmed.federation.site import simulated_sites, train_site
from fedmed.models import build_model

cfg = load_config(sys.argv[1])
spec = simulated_sites(cfg)[0]
site_cfg = config_for_site(config_json(cfg), spec)
torch.manual_seed(0)
model = build_model(cfg.model, 1, cfg.num_classes)
weights = {k: v.numpy() for k, v in model.state_dict().items()}
for server_round, epochs in json.loads(sys.argv[3]):
    result, _ = train_site(site_cfg, spec, weights, server_round=server_round, total_rounds=3,
                           local_epochs=epochs, run_name=sys.argv[2])
    print(f"round {server_round} epsilon {result.epsilon}", flush=True)
"""


def _child(config: Path, script: Path, run: str, rounds: list[list[int]]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), str(config), run, json.dumps(rounds)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def test_killed_site_and_new_run_name_continue_the_lifetime_epsilon(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", privacy={"dp_required": True})
    config = make_federation(
        tmp_path, sites=("a",), cases=8, secure=False,
        model={"channels": [4, 8], "num_res_units": 0, "norm": "instance"},
        federation={"rounds": 3, "min_train_sites": 1, "min_available_sites": 1},
        privacy={"enabled": True, "noise_multiplier": SIGMA, "target_epsilon": None,
                 "delta": DELTA, "expected_batch_size": 2},
    )
    raw = config.read_text().replace("path: site-a", f"path: site-a\n  policy: {policy}")
    config.write_text(raw)
    state = load_config(config).site_state_dir("a")
    script = tmp_path / "site.py"
    script.write_text(_CHILD)

    # run A: round 1 finishes, round 2 (far too long) is killed once it has started
    proc = _child(config, script, "run-A", [[1, 1], [2, 100000]])
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("round 1 epsilon"), line
        time.sleep(3.0)
        assert proc.poll() is None, "round 2 ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (after_kill,) = lifetime_report(state)
    assert [r["steps"] for r in after_kill["runs"]] == [STEPS]
    assert after_kill["epsilon"] == pytest.approx(compute_epsilon([(SIGMA, Q, STEPS)], DELTA))

    # a restarted site, under a new run name, continues the dataset's count
    done = _child(config, script, "run-B", [[1, 1]])
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    (after,) = lifetime_report(state)
    assert after["dataset"] == after_kill["dataset"]
    assert sorted(r["run_id"] for r in after["runs"]) == ["run-A", "run-B"]
    assert after["epsilon"] == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * STEPS)], DELTA))
    # each run's own figure is still its own
    assert all(r["epsilon"] == pytest.approx(compute_epsilon([(SIGMA, Q, STEPS)], DELTA))
               for r in after["runs"])
    # the privacy report command shows the same
    from fedmed.cli.main import main

    assert main(["privacy", "report", "--state-dir", str(state), "--json"]) == 0
