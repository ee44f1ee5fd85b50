"""End to end on loopback: `flwr run .` against a real TLS SuperLink with three SuperNodes.

A SuperLink with TLS and SuperNode authentication, three registered SuperNodes (one tiny
site each, from their own ``data-dir``), the fedmed app submitted with ``flwr run . NAME``
from a temporary ``FLWR_HOME``; secure aggregation on, one round (a second round adds
50-75 s on a loaded 2-core machine; the restarted site then trains in it). One SuperNode is
killed during round 1: the run finishes with the other two (``min_train_sites: 2``), and the
killed site, restarted by a supervisor loop while the SuperLink still holds its old session,
is activated again. An unregistered node and a plaintext client are refused. Nothing
downloads: the SuperLink runs with
``--disable-runtime-dependency-installation`` and the app from this venv.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from test_secagg import make_federation

from fedmed.federation.deployment import (
    ManagedProcess,
    flower_env,
    flwr_run_command,
    free_port,
    start_supernode_until_active,
    superlink_command,
    supernode_command,
    write_flwr_config,
)
from fedmed.security.certs import create_site_keys, init_ca_and_server, registration_command

BIN = Path(sys.executable).parent
APP = Path(__file__).resolve().parents[1]
CONNECTION = "fedmed-e2e"
SITES = ("a", "b", "c")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("flower-superlink", path=str(BIN)) is None,
        reason="flower-superlink is not installed next to this interpreter",
    ),
]


def _flwr(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run(
        [str(BIN / "flwr"), *args], env=env, cwd=APP, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _register(key: Path, name: str, env: dict[str, str]) -> int:
    argv = registration_command(key, name, CONNECTION)
    out = _flwr([*argv[1:], "--format", "json"], env)
    return int(json.loads(out[out.index("{"):])["node-id"])


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return True
        time.sleep(0.5)
    return False


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


@pytest.mark.timeout(240)
def test_flwr_run_with_secagg_survives_a_dropped_site(tmp_path: Path) -> None:
    config = make_federation(
        tmp_path, federation={"rounds": 1, "round_timeout_s": 40, "min_available_sites": 2},
    )
    raw = yaml.safe_load(config.read_text())
    raw["root"] = str(tmp_path)
    config.write_text(yaml.safe_dump(raw))
    certs = init_ca_and_server(tmp_path / "certs", "localhost", ["127.0.0.1"], 1)
    port = free_port()
    address = f"127.0.0.1:{port}"
    flwr_home = tmp_path / "flwr-home"
    write_flwr_config(flwr_home, {CONNECTION: (address, certs.ca_cert)})
    env = flower_env(flwr_home=flwr_home, bin_dir=BIN)
    env["OMP_NUM_THREADS"] = "1"
    procs: list[ManagedProcess] = []
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=1)

    def node(name: str, key: Path, *, log: str | None = None) -> ManagedProcess:
        argv = supernode_command(
            superlink=address, data_dir=tmp_path / f"site-{name}",
            state_dir=tmp_path / "state" / name, cache_dir=tmp_path / "cache" / name,
            site_name=name, root_cert=certs.ca_cert, auth_key=key, port=free_port(),
            executable=str(BIN / "flower-supernode"),
        )
        proc = ManagedProcess(argv, log_path=tmp_path / (log or f"node-{name}.log"), env=env)
        procs.append(proc)
        return proc

    superlink = ManagedProcess(
        superlink_command(
            ca_cert=certs.ca_cert, server_cert=certs.server_cert, server_key=certs.server_key,
            host="127.0.0.1", port=port, database=tmp_path / "superlink.db",
            executable=str(BIN / "flower-superlink"),
        ),
        log_path=tmp_path / "superlink.log", env=env, port=("127.0.0.1", port),
    )
    procs.append(superlink)
    try:
        superlink.start()
        assert superlink.wait_for_log(r"Uvicorn running on https://", 30), superlink.log_tail()

        # Refused: plain HTTP on the TLS port, and a SuperNode whose key is not registered
        # (checked below, once the registered ones are up: it needs no waiting of its own).
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{address}/health", timeout=5)
        outsider = create_site_keys(tmp_path / "keys", "outsider")
        intruder = node("a", outsider.private_key, log="outsider.log").start()

        keys = {s: create_site_keys(tmp_path / "keys", f"site-{s}") for s in SITES}
        # flwr CLI start-up dominates: register the three keys side by side.
        with ThreadPoolExecutor(max_workers=len(SITES)) as regs:
            ids = dict(zip(SITES, regs.map(
                lambda s: _register(keys[s].public_key, f"site-{s}", env), SITES
            ), strict=True))
        nodes = {s: node(s, keys[s].private_key).start() for s in SITES}
        for s in SITES:
            assert superlink.wait_for_log(
                rf"Activated node_id={ids[s]}", 30
            ), superlink.log_tail()
        assert intruder.wait_for_log(r"Failed to activate SuperNode", 30), intruder.log_tail()
        intruder.stop()  # its orphaned SuperExec would keep retrying (CPU)

        out = tmp_path / "run"
        argv = flwr_run_command(
            ".", CONNECTION,
            {"fedmed-config": str(config), "run-dir": str(out), "rounds": 1}, stream=False,
        )
        _flwr(argv[1:], env, timeout=90)

        # Kill site c (SIGKILL, whole process group) at its third SecAgg+ message of round 1
        # (the masked-vector stage, while it trains): it has shared its keys, so the
        # others' shares must rebuild its masks.
        victim = nodes["c"]
        assert victim.wait_for_log(r"(Receiving: train message[\s\S]*){3}", 90), (
            victim.log_tail() + superlink.log_tail()
        )
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()

        # The site comes back at once with the same key. The SuperLink refuses it while the
        # killed session is still online (Flower 1.41: 30 s heartbeats, patience 2, so
        # 33-60 s after the kill) and flower-supernode exits on that refusal (code 305), so
        # a supervisor restarts it until it is activated; the run goes on with a and b.
        nodes["c"] = node("c", keys["c"].private_key, log="node-c-restarted.log")
        def restart_c() -> tuple[int, float]:
            tries = start_supernode_until_active(
                nodes["c"], timeout=120, retry_delay=5.0, cancel=cancel
            )
            return tries, time.monotonic() - killed_at

        rejoin = pool.submit(restart_c)

        assert _wait_file(out / "summary.json", 150), (
            superlink.log_tail(60) + "\n" + nodes["a"].log_tail()
        )
        attempts, rejoined_after = rejoin.result(
            timeout=max(1.0, killed_at + 125 - time.monotonic())
        )
        # Refused first (the old session was still online), activated later, still running.
        assert attempts >= 2, nodes["c"].log_text()
        log = superlink.log_text()
        assert f"SuperNode with node ID {ids['c']} could not be activated" in log
        assert _count(rf"Activated node_id={ids['c']}\b", log) == 2, superlink.log_tail()
        assert nodes["c"].returncode is None, nodes["c"].log_tail()
        # The old session expires 33-60 s after the kill; then one retry delay and a start.
        assert rejoined_after < 100, rejoined_after

        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [1]
        assert all(x["secure_aggregation"] for x in lines)
        # Round 1 finished without site c (killed mid-protocol), with a and b.
        assert {"a", "b"} <= set(lines[0]["sites_trained"]) and "c" not in lines[0][
            "sites_trained"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["secure_aggregation"] is True and summary["dice_mean"] is not None
    finally:
        cancel.set()
        pool.shutdown(wait=True)
        # SuperNodes deactivate themselves on SIGTERM (a second or two each): in parallel,
        # then the SuperLink.
        with ThreadPoolExecutor(max_workers=len(procs)) as stoppers:
            list(stoppers.map(ManagedProcess.stop, procs[1:]))
        superlink.stop()
    assert all(p.returncode is not None for p in procs)
