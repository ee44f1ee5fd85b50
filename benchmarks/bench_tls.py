"""Does TLS hide the model on the wire? Capture one round of a real deployment on loopback.

The deployment of docs/deploy.md (:class:`tests.support.deployment.DeployedFederation`):
nginx on the public address in front of a TLS SuperLink with node authentication, two
SuperNodes in process isolation with their hospitals' executors, one FedAvg round of a tiny
U-Net. Both hops are captured: SuperNodes to the proxy (public) and proxy to the SuperLink
(internal), with ``tcpdump -i lo`` when it is installed and allowed; else a transparent
asyncio TCP relay in front of the proxy captures the public hop only. The captured bytes
are searched for 64-byte windows of the ``.npy`` payloads of the global weights the
coordinator sends in round 1 (the seeded initial model, rebuilt here exactly as the
ServerApp builds it).

Figures: matches under TLS behind the proxy (target 0); matches in the same round run
with ``--insecure`` directly against a SuperLink (the positive control: it must be > 0, or
the search proves nothing); bytes captured under TLS.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from benchmarks.bench_secagg import _write_federation
from benchmarks.common import Figure

HERE = Path(__file__).resolve().parent

NAME = "tls"
BIN = Path(sys.executable).parent
APP = HERE.parent
SITES = ("a", "b")
WINDOW = 64


def _weight_windows(config: Path, per_array: int = 2) -> list[bytes]:
    """64-byte windows of the serialized initial global weights (what round 1 sends)."""
    from flwr.app import Array

    from fedmed.config import load_config
    from fedmed.federation.coordinator import Coordinator
    from fedmed.federation.rundir import RunDir

    cfg = load_config(config)
    probe = Coordinator(cfg, RunDir.create(config.parent / "probe-run", cfg))
    windows: list[bytes] = []
    for arr in probe.initial_arrays().values():
        data = Array(arr).data
        body = data[128:]  # past the .npy header (128 bytes for these shapes)
        for k in range(per_array):
            start = (k + 1) * len(body) // (per_array + 1) - WINDOW // 2
            win = body[max(0, start): max(0, start) + WINDOW]
            # Constant windows (zero biases, ones of norm layers) would match anything.
            if len(win) == WINDOW and len(set(win)) >= 24:
                windows.append(win)
    if len(windows) < 4:
        raise RuntimeError(f"only {len(windows)} usable weight windows; model too small?")
    return windows


class _Proxy:
    """Transparent TCP proxy on 127.0.0.1 recording both directions (fallback capture)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.chunks: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.chunks.append(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> _Proxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def captured(self) -> bytes:
        return b"".join(self.chunks)


@contextmanager
def _capture(ports: list[int], tmp: Path) -> Iterator[tuple[str, int, list[bytes]]]:
    """Yield (method, port SuperNodes connect to, holder of the captured bytes).

    ``ports[0]`` is where SuperNodes connect; tcpdump records all ``ports``, the fallback
    relay only the first.
    """
    from tests.support.processes import ManagedProcess

    holder: list[bytes] = []
    tcpdump = shutil.which("tcpdump")
    if tcpdump:
        pcap = tmp / "capture.pcap"
        where = " or ".join(f"tcp port {p}" for p in ports)
        dump = ManagedProcess(
            [tcpdump, "-i", "lo", "-s", "0", "-U", "-w", str(pcap), *where.split()],
            log_path=tmp / "tcpdump.log", stop_timeout=5,
        )
        dump.start()
        if dump.wait_for_log(r"listening on lo", 10):
            try:
                yield f"tcpdump -i lo, {len(ports)} ports", ports[0], holder
            finally:
                time.sleep(0.5)
                dump.stop()
                holder.append(pcap.read_bytes() if pcap.exists() else b"")
            return
        dump.stop()  # not permitted (no CAP_NET_RAW): fall back to the relay
    with _Proxy(ports[0]) as proxy:
        try:
            yield "asyncio TCP relay (public hop only)", proxy.port, holder
        finally:
            holder.append(proxy.captured())


def _round_behind_proxy(root: Path, config: Path) -> tuple[str, bytes]:
    """One FedAvg round through nginx + a TLS SuperLink; (capture method, captured bytes)."""
    from fedmed.config import load_config
    from fedmed.policy import approve_app, policy_permitting
    from fedmed.security.approval import fab_hash
    from tests.support.debian import ensure_nginx
    from tests.support.deployment import DeployedFederation, snapshot_app

    tmp = root / "tls"
    tmp.mkdir()
    cfg = load_config(config)
    app = snapshot_app(APP, tmp / "app")
    deployment = DeployedFederation(
        tmp / "deploy", {s: root / f"site-{s}" for s in SITES},
        {s: policy_permitting(cfg, site=s) for s in SITES}, ensure_nginx(),
    )
    ports = [deployment.proxy_port, deployment.superlink_port]
    with _capture(ports, tmp) as (method, node_port, holder):
        if node_port != deployment.proxy_port:
            deployment.fleet_address = f"127.0.0.1:{node_port}"
        with deployment:
            for hospital in deployment.hospitals.values():
                approve_app(hospital.policy, fab_hash(app), "bench_tls")
            out = tmp / "run"
            deployment.run_app(app, {"fedmed-config": str(config), "run-dir": str(out),
                                     "rounds": 1}, timeout=600)
            if not (out / "summary.json").is_file():
                raise RuntimeError(f"tls run did not finish:\n{deployment.superlink.log_tail()}")
    return method, holder[0]


def _insecure_round(root: Path, config: Path) -> tuple[str, bytes]:
    """The positive control: the same round over plain HTTP, directly to a SuperLink."""
    from tests.support.deployment import snapshot_app
    from tests.support.flower_commands import (
        flwr_run_command,
        superlink_command,
        supernode_command,
        write_flwr_config,
    )
    from tests.support.processes import (
        ManagedProcess,
        flower_env,
        free_port,
        start_supernode_until_active,
    )

    tmp = root / "insecure"
    tmp.mkdir()
    app = snapshot_app(APP, tmp / "app")
    port = free_port()
    write_flwr_config(tmp / "flwr-home", {"insecure": (f"127.0.0.1:{port}", None)})
    env = flower_env(flwr_home=tmp / "flwr-home", bin_dir=BIN)
    env["OMP_NUM_THREADS"] = "1"
    superlink = ManagedProcess(
        superlink_command(host="127.0.0.1", port=port, insecure=True, node_auth=False,
                          executable=str(BIN / "flower-superlink")),
        log_path=tmp / "superlink.log", env=env, port=("127.0.0.1", port),
    )
    procs = [superlink]
    try:
        superlink.start()
        with _capture([port], tmp) as (method, node_port, holder):
            for site in SITES:
                node = ManagedProcess(
                    supernode_command(
                        superlink=f"127.0.0.1:{node_port}", data_dir=root / f"site-{site}",
                        state_dir=tmp / "state" / site, cache_dir=tmp / "cache" / site,
                        site_name=site, insecure=True, port=free_port(),
                        isolation="subprocess", executable=str(BIN / "flower-supernode"),
                    ),
                    log_path=tmp / f"node-{site}.log", env=env,
                )
                procs.append(node)
                start_supernode_until_active(node, timeout=60)
            out = tmp / "run"
            argv = flwr_run_command(app, "insecure", {"fedmed-config": str(config),
                                                      "run-dir": str(out), "rounds": 1})
            subprocess.run([str(BIN / "flwr"), *argv[1:]], env=env, cwd=app, check=True,
                           capture_output=True, timeout=600)
            if not (out / "summary.json").is_file():
                raise RuntimeError(f"insecure run did not finish:\n{superlink.log_tail()}")
        return method, holder[0]
    finally:
        for proc in reversed(procs):
            proc.stop()


def run(quick: bool = False) -> list[Figure]:
    """Capture one round with TLS and one with ``--insecure``; count weight windows seen."""
    import warnings

    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmpdir:
        root = Path(tmpdir)
        raw = _write_federation(root, cases=2, size=16, rounds=1)
        raw["sites"] = [s for s in raw["sites"] if s["name"] in SITES]
        raw["federation"].update(min_train_sites=2, min_available_sites=2,
                                 round_timeout_s=120)
        config = root / "federation.yaml"
        config.write_text(yaml.safe_dump(raw))
        windows = _weight_windows(config)
        captured: dict[str, bytes] = {}
        methods: dict[str, str] = {}
        methods["tls"], captured["tls"] = _round_behind_proxy(root, config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the --insecure warning is expected here
            methods["insecure"], captured["insecure"] = _insecure_round(root, config)
    hits = {k: sum(v.count(w) for w in windows) for k, v in captured.items()}
    detail = (
        f"one FedAvg round behind the nginx proxy (TLS to the proxy and from it to the "
        f"SuperLink), 2 SuperNodes with executors, U-Net (4, 8, 16); {len(windows)} windows of "
        f"{WINDOW} bytes from the .npy payloads of the round-1 global weights; capture: "
        f"{methods['tls']}"
    )
    extra = {"bytes": {k: len(v) for k, v in captured.items()}, "hits": hits}
    return [
        Figure(NAME, "weight_windows_seen_under_tls", hits["tls"], "matches", "0",
               hits["tls"] == 0, detail, extra),
        Figure(NAME, "weight_windows_seen_insecure_control", hits["insecure"], "matches",
               "> 0 (positive control)", hits["insecure"] > 0,
               f"same round with --insecure (plain HTTP, no proxy); "
               f"{len(captured['insecure']):,} bytes",
               extra),
        Figure(NAME, "bytes_captured_under_tls", len(captured["tls"]), "bytes", "> 0",
               len(captured["tls"]) > 0,
               "everything to/from the proxy's and the SuperLink's ports", extra),
    ]


if __name__ == "__main__":
    for fig in run(quick="--quick" in sys.argv):
        print(json.dumps(fig.as_dict(), indent=2))
