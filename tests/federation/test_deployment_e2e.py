"""End to end on loopback: the deployment of docs/deploy.md with real processes.

nginx on the public address (TLS, Fleet API only) in front of a real ``flower-superlink``
with TLS and SuperNode authentication bound to 127.0.0.1; three real ``flower-supernode``s
in process isolation, each with its hospital's own executor (``fedmed site executor``, a
separate process that is not given the SuperNode's key) enforcing the hospital's site
policy. The operator starts runs on the internal address; hospitals reach only the proxy.

In order, on one deployment (module fixture):

1. With only what a hospital holds (the CA certificate, its own key), every Control API call
   to the public address is refused; so are a plaintext client and an unregistered node.
2. The approved app (a frozen copy of this checkout, approved by its bundle hash) trains
   two rounds through the public address, all three sites in both.
3. The same app with one changed line (it would write a marker file when imported) is
   refused by every hospital with ``app-not-approved``, recorded by the coordinator;
   nothing of it is unpacked or imported (no marker file).
4. The approved app runs again, with secure aggregation, while one SuperNode is killed
   during round 1: the round finishes with the other two, and the killed site, restarted by
   a supervisor while the SuperLink still holds its old session, is activated again.

Nothing downloads: no runtime dependency installation anywhere, the apps come from this
venv. Every process is stopped in the fixture's teardown, also on failure.
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from fedmed.config import load_config
from fedmed.policy import approve_app, policy_permitting
from fedmed.security.approval import APP_NOT_APPROVED, fab_hash
from fedmed.security.certs import create_site_keys
from tests.support.debian import NginxUnavailable, ensure_nginx
from tests.support.deployment import BIN, PUBLIC, DeployedFederation, snapshot_app
from tests.support.federations import SITES, make_federation
from tests.support.processes import start_supernode_until_active

CHECKOUT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # Flower's bundle builder uses a pathspec API that pathspec deprecates.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*"),
    pytest.mark.skipif(
        shutil.which("flower-superlink", path=str(BIN)) is None,
        reason="flower-superlink is not installed next to this interpreter",
    ),
]


@dataclass
class World:
    tmp: Path
    deployment: DeployedFederation
    app: Path
    digest: str
    plain: Path
    secure: Path


def _write_config(tmp: Path, name: str, secagg: bool) -> Path:
    folder = tmp / name
    folder.mkdir()
    path = make_federation(
        folder, federation={"rounds": 2, "round_timeout_s": 40, "min_available_sites": 2},
        secure_aggregation={"enabled": secagg},
    )
    raw = yaml.safe_load(path.read_text())
    raw["root"] = str(folder)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    try:
        nginx = ensure_nginx()
    except NginxUnavailable as exc:
        pytest.skip(str(exc))
    tmp = tmp_path_factory.mktemp("e2e")
    plain, secure = _write_config(tmp, "plain", False), _write_config(tmp, "secure", True)
    app = snapshot_app(CHECKOUT, tmp / "app")
    digest = fab_hash(app)
    cfg = load_config(plain)
    deployment = DeployedFederation(
        tmp / "deploy", {s: plain.parent / f"site-{s}" for s in SITES},
        {s: policy_permitting(cfg, site=s) for s in SITES}, nginx,
    )
    started = time.monotonic()
    with deployment:
        for hospital in deployment.hospitals.values():
            approve_app(hospital.policy, digest, "e2e reviewer", note="this checkout")
        print(f"deployment up in {time.monotonic() - started:.1f} s")
        yield World(tmp, deployment, app, digest, plain, secure)
    assert all(p.returncode is not None for p in deployment.processes())


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(240)
def test_only_the_fleet_api_is_public(world: World) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    dep = world.deployment
    a = dep.hospitals["a"]
    # The executors were never given their SuperNode's key (nor its folder).
    for hospital in dep.hospitals.values():
        given = " ".join([*hospital.executor.argv, *(hospital.executor.env or {}).values()])
        assert str(hospital.keys.private_key.parent) not in given
        assert str(hospital.keys.private_key) in " ".join(hospital.node.argv)
    outsider = create_site_keys(world.tmp / "keys", "outsider")
    # The flwr CLI with a connection to the public address (CA certificate only): start a
    # run, list runs, register a node, unregister a node. Side by side (CLI start-up).
    calls = {
        "start a run": ["run", str(world.app), PUBLIC],
        "list runs": ["ls", PUBLIC],
        "register a node": ["supernode", "register", str(outsider.public_key), PUBLIC],
        "unregister a node": ["supernode", "unregister", str(a.node_id), PUBLIC],
    }
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        done = dict(zip(calls, pool.map(lambda argv: dep.flwr(argv, cwd=world.app),
                                        calls.values()), strict=True))
    for what, result in done.items():
        assert result.returncode != 0 and "403 Forbidden" in result.stdout + result.stderr, (
            what, result.stdout + result.stderr)

    # The same with the hospital's own key: a Control call signed as SuperNode a.
    key = load_ssh_private_key(a.keys.private_key.read_bytes(), None)
    client = ControlHttpClient.from_server_address(
        dep.public_address, insecure=False, root_certificates=dep.certs.ca_cert.read_bytes(),
        interceptors=[NodeAuthHttpInterceptor(key, key.public_key())],  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(Exception, match="403"):
            client.ListRuns(ListRunsRequest())
    finally:
        client.close()

    # Plain HTTP to the public port gets no Flower answer.
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(f"http://{dep.public_address}/v1/fleet/get-run", timeout=5)
    assert plain.value.code == 400

    # An unregistered SuperNode is refused through the proxy.
    intruder = dep.supernode("outsider", outsider.private_key, data=world.plain.parent / "site-a",
                             log="outsider.log", isolation="subprocess")
    dep.extra.append(intruder)
    intruder.start()
    assert intruder.wait_for_log(r"Failed to activate SuperNode", 60), intruder.log_tail()
    intruder.stop()

    # Nothing changed behind the door: no run, node a still registered, outsider unknown.
    runs = dep.flwr(["ls", "operator", "--format", "json"])
    assert json.loads(runs.stdout[runs.stdout.index("{"):])["runs"] == [], runs.stdout
    nodes = dep.flwr(["supernode", "list", "operator", "--format", "json"])
    listed = json.loads(nodes.stdout[nodes.stdout.index("{"):])["nodes"]
    assert {int(n["node-id"]) for n in listed} == {h.node_id for h in dep.hospitals.values()}
    # Only the Fleet API reached the SuperLink: the proxy answered everything else itself.
    access = (dep.root / "proxy" / "access.log").read_text()
    forwarded = re.findall(r'"POST (/v1/\S+) HTTP/1.1" 200', access)
    assert forwarded and all(p.startswith("/v1/fleet/") for p in forwarded)
    assert not re.search(r'"POST /v1/control/\S+ HTTP/1.1" 200', access)


@pytest.mark.timeout(300)
def test_approved_app_trains_two_rounds(world: World) -> None:
    out = world.tmp / "run-approved"
    started = time.monotonic()
    world.deployment.run_app(
        world.app, {"fedmed-config": str(world.plain), "run-dir": str(out), "rounds": 2}
    )
    print(f"approved run: {time.monotonic() - started:.1f} s")
    lines = _lines(out)
    assert [x["round"] for x in lines] == [1, 2]
    assert all(sorted(x["sites_trained"]) == list(SITES) for x in lines), lines
    assert json.loads((out / "summary.json").read_text())["dice_mean"] is not None
    for hospital in world.deployment.hospitals.values():
        log = hospital.executor.log_text()
        assert len(re.findall(rf"bundle {world.digest} is approved", log)) >= 2, log[-2000:]


@pytest.mark.timeout(240)
def test_modified_bundle_is_refused_by_every_hospital(world: World) -> None:
    dep = world.deployment
    modified = world.tmp / "app-modified"
    shutil.copytree(world.app, modified)
    marker = world.tmp / "unapproved-code-ran"
    client = modified / "client" / "app.py"
    lines = client.read_text().splitlines(keepends=True)
    i = max(k for k, line in enumerate(lines) if line.startswith("app = "))
    change = f'__import__("pathlib").Path({str(marker)!r}).write_text("ran")'
    lines[i] = lines[i].rstrip("\n") + f"; {change}\n"
    client.write_text("".join(lines))
    # Positive control: the changed line does write the marker when it runs.
    subprocess.run([sys.executable, "-c", change], check=True, timeout=30)
    assert marker.is_file()
    marker.unlink()
    refused = fab_hash(modified)
    assert refused != world.digest

    out = world.tmp / "run-modified"
    started = time.monotonic()
    _, log = dep.run_app(
        modified, {"fedmed-config": str(world.plain), "run-dir": str(out), "rounds": 1}
    )
    print(f"refused run: {time.monotonic() - started:.1f} s")
    assert not marker.exists()
    # The coordinator recorded the refusal of every hospital, by node, as the reason code.
    (line,) = _lines(out)
    recorded = json.dumps(line)
    assert line["sites_trained"] == [] and recorded.count(APP_NOT_APPROVED) >= len(SITES)
    assert all(str(h.node_id) in recorded for h in dep.hospitals.values()), recorded
    for hospital in dep.hospitals.values():
        text = hospital.executor.log_text()
        assert f"app bundle {refused} is not approved" in text, text[-2000:]
        # Never unpacked: Flower logs every bundle it installs.
        assert f".{refused[:8]}" not in text and "unapproved-code-ran" not in text
    assert "unapproved-code-ran" not in log


@pytest.mark.timeout(300)
def test_approved_app_runs_again_and_survives_a_dropped_site(world: World) -> None:
    dep = world.deployment
    out = world.tmp / "run-again"
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=2)
    started = time.monotonic()
    run = pool.submit(dep.run_app, world.app, {
        "fedmed-config": str(world.secure), "run-dir": str(out), "rounds": 1,
    })
    try:
        # Kill site c's SuperNode (SIGKILL, whole group) at its third SecAgg+ message of the
        # round (the masked-vector stage): it has shared its keys, so the others' shares
        # must rebuild its masks. Its executor stays up and reconnects to the new one.
        victim = dep.hospitals["c"]
        offset = len(victim.node.log_text())
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not re.search(
            r"(Receiving: train message[\s\S]*){3}", victim.node.log_text()[offset:]
        ):
            assert not run.done(), run.result()
            time.sleep(0.5)
        assert victim.node.process is not None
        os.killpg(victim.node.process.pid, signal.SIGKILL)
        victim.node.wait(10)
        killed_at = time.monotonic()

        # Back at once with the same key; the SuperLink refuses it while the killed session
        # is still online (30 s heartbeats, patience 2: 33-60 s), and flower-supernode exits
        # on that refusal, so a supervisor restarts it until it is activated.
        victim.node = dep.supernode(
            "c", victim.keys.private_key, data=victim.data_dir, policy=victim.policy,
            secret=victim.secret, runtime_port=victim.runtime_port, log="node-c-restarted.log",
        )
        rejoin = pool.submit(
            start_supernode_until_active, victim.node, timeout=120, retry_delay=5.0,
            cancel=cancel,
        )
        run.result(timeout=240)
        attempts = rejoin.result(timeout=max(1.0, killed_at + 125 - time.monotonic()))
        rejoined_after = time.monotonic() - killed_at
    finally:
        cancel.set()
        pool.shutdown(wait=True)
    print(f"run with a dropped site: {time.monotonic() - started:.1f} s; c rejoined "
          f"{rejoined_after:.0f} s after the kill in {attempts} starts")
    log = dep.superlink.log_text()
    assert attempts >= 2, victim.node.log_text()
    assert f"SuperNode with node ID {victim.node_id} could not be activated" in log
    assert len(re.findall(rf"Activated node_id={victim.node_id}\b", log)) == 2
    assert victim.node.returncode is None, victim.node.log_tail()
    assert rejoined_after < 100, rejoined_after
    (line,) = _lines(out)
    assert line["secure_aggregation"] and sorted(line["sites_trained"]) == ["a", "b"], line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["dice_mean"] is not None
