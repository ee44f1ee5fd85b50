"""``fedmed simulate --ray-address``: a federation run on an already running Ray cluster.

A real Ray head is started on loopback from the venv's ``ray`` binary (``ray start --head
--block``, 2 CPUs, no dashboard, its own short temp dir), the simulation attaches to it and
runs one round of a 2-site federation of tiny NIfTI cases; the head is stopped afterwards
by ending exactly the processes this test started (``ray stop`` would also end other Ray
instances on a shared machine).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from fedmed.cli.main import main as cli_main
from fedmed.config import load_config
from fedmed.errors import ConfigError
from fedmed.federation.simulation import backend_config, check_ray_address, run_federated

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """End the ``ray start`` process and every process it started (GCS, raylet, workers)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture()
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1:<free port>; yields its address, always stopped after."""
    if not RAY.is_file():
        pytest.skip(f"no ray executable next to {sys.executable}")
    port = _free_port()
    # Ray's unix sockets live under the temp dir: keep its path short (108-byte limit).
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the Ray head did not open its port within 60 s")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _federation(root: Path, make_site: Callable[..., Path]) -> Path:
    sites = {
        name: make_site(root / name, "folder", n_cases=3, shape=(20, 20, 20), name=name)
        for name in ("site-a", "site-b")
    }
    central = make_site(root / "central", "folder", n_cases=1, shape=(20, 20, 20))
    cfg = {
        "name": "ray-cluster",
        "modalities": ["T1", "T2", "FLAIR"],
        "labels": {0: "background", 1: "tissue", 2: "lesion"},
        "sites": [{"name": n, "path": str(p)} for n, p in sites.items()],
        "central_test": str(central),
        "preprocessing": {"target_spacing": [1.5, 1.5, 1.5], "patch_size": [16, 16, 16],
                          "patches_per_case": 1, "augment": False},
        "model": {"channels": [4, 8, 16], "num_res_units": 0},
        "training": {"batch_size": 2, "amp": False, "progress": False, "device": "cpu",
                     "sw_batch_size": 4, "val_fraction": 0.0, "test_fraction": 0.0},
        "federation": {"rounds": 1, "local_epochs": 1, "min_train_sites": 2,
                       "min_available_sites": 2, "evaluate_sites": False,
                       "round_timeout_s": 120},
    }
    path = root / "federation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_backend_config_attaches_without_resource_counts(tmp_path: Path,
                                                         make_site: Callable[..., Path]) -> None:
    cfg = load_config(_federation(tmp_path, make_site))
    own = backend_config(cfg, cpu_count=2)
    assert own["init_args"]["num_cpus"] == 2
    assert "address" not in own["init_args"]
    attached = backend_config(cfg, ray_address="10.0.0.5:6379")
    # Ray rejects num_cpus/num_gpus when connecting to an existing cluster.
    assert attached["init_args"]["address"] == "10.0.0.5:6379"
    assert not {"num_cpus", "num_gpus"} & set(attached["init_args"])
    assert attached["client_resources"] == own["client_resources"]


def test_unreachable_or_malformed_address_is_a_config_error() -> None:
    assert check_ray_address(" auto ") == "auto"
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_ray_address("localhost")
    with pytest.raises(ConfigError, match="no Ray head answers"):
        check_ray_address(f"127.0.0.1:{_free_port()}")


def test_simulate_cli_reports_unreachable_ray_address(
    tmp_path: Path, make_site: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _federation(tmp_path, make_site)
    port = _free_port()
    code = cli_main(["simulate", "--config", str(path), "--out", str(tmp_path / "run"),
                     "--ray-address", f"127.0.0.1:{port}"])
    assert code == 1
    out = capsys.readouterr()
    assert f"127.0.0.1:{port}" in out.out + out.err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_simulation_runs_on_an_existing_ray_cluster(
    tmp_path: Path, make_site: Callable[..., Path], ray_head: str
) -> None:
    import ray

    cfg = load_config(_federation(tmp_path, make_site))
    out = tmp_path / "run"
    summary = run_federated(cfg, out, ray_address=ray_head)
    assert summary["mode"] == "federated"
    assert summary["rounds"] == 1
    assert summary["sites"] == ["site-a", "site-b"]
    assert summary["bytes_received"] > 0
    assert summary["dice_mean"] is not None and 0.0 <= summary["dice_mean"] <= 1.0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["sites_trained"] for line in lines] == [["site-a", "site-b"]]
    assert (out / "model.pt").is_file()
    # Only this driver's connection was closed: the cluster is still up for the next job.
    assert not ray.is_initialized()
    host, port = ray_head.split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        pass
