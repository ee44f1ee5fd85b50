"""Does TLS hide the model on the wire? Capture one round of a real federation on loopback.

A SuperLink and two SuperNodes (``flower-superlink``/``flower-supernode`` of this venv) run
one FedAvg round of a tiny U-Net; everything sent to or from the SuperLink's port is
captured (``tcpdump -i lo`` when it is installed and allowed, else a transparent asyncio
TCP proxy between the SuperNodes and the SuperLink). The captured bytes are searched for
64-byte windows of the ``.npy`` payloads of the global weights the coordinator sends in
round 1 (the seeded initial model, rebuilt here exactly as the ServerApp builds it).

Figures: matches under TLS + node authentication (target 0); matches in the same round run
with ``--insecure`` (the positive control: it must be > 0, or the search proves nothing);
bytes captured under TLS.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_secagg import _write_federation  # noqa: E402
from benchmarks.common import Figure  # noqa: E402

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
def _capture(port: int, tmp: Path) -> Iterator[tuple[str, int, list[bytes]]]:
    """Yield (method, port SuperNodes connect to, holder of the captured bytes)."""
    from fedmed.federation.deployment import ManagedProcess

    holder: list[bytes] = []
    tcpdump = shutil.which("tcpdump")
    if tcpdump:
        pcap = tmp / f"capture-{port}.pcap"
        dump = ManagedProcess(
            [tcpdump, "-i", "lo", "-s", "0", "-U", "-w", str(pcap), "tcp", "port", str(port)],
            log_path=tmp / f"tcpdump-{port}.log", stop_timeout=5,
        )
        dump.start()
        if dump.wait_for_log(r"listening on lo", 10):
            try:
                yield "tcpdump -i lo", port, holder
            finally:
                time.sleep(0.5)
                dump.stop()
                holder.append(pcap.read_bytes() if pcap.exists() else b"")
            return
        dump.stop()  # not permitted (no CAP_NET_RAW): fall back to the proxy
    with _Proxy(port) as proxy:
        try:
            yield "asyncio TCP proxy", proxy.port, holder
        finally:
            holder.append(proxy.captured())


def _one_round(root: Path, config: Path, *, tls: bool) -> tuple[str, bytes]:
    """One FedAvg round over a real SuperLink; (capture method, captured bytes)."""
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

    mode = "tls" if tls else "insecure"
    tmp = root / mode
    tmp.mkdir()
    port = free_port()
    certs = init_ca_and_server(tmp / "certs", "localhost", ["127.0.0.1"], 1) if tls else None
    flwr_home = tmp / "flwr-home"
    write_flwr_config(flwr_home, {mode: (f"127.0.0.1:{port}", certs.ca_cert if certs else None)})
    env = flower_env(flwr_home=flwr_home, bin_dir=BIN)
    env["OMP_NUM_THREADS"] = "1"
    tls_args = (
        {"ca_cert": certs.ca_cert, "server_cert": certs.server_cert,
         "server_key": certs.server_key}
        if certs else {"insecure": True, "node_auth": False}
    )
    superlink = ManagedProcess(
        superlink_command(host="127.0.0.1", port=port, executable=str(BIN / "flower-superlink"),
                          **tls_args),
        log_path=tmp / "superlink.log", env=env, port=("127.0.0.1", port),
    )
    procs = [superlink]
    try:
        superlink.start()
        with _capture(port, tmp) as (method, node_port, holder):
            for site in SITES:
                key = None
                if certs:
                    keys = create_site_keys(tmp / "keys", f"site-{site}")
                    key = keys.private_key
                    argv = registration_command(keys.public_key, f"site-{site}", mode)
                    subprocess.run([str(BIN / "flwr"), *argv[1:]], env=env, cwd=APP,
                                   check=True, capture_output=True, timeout=60)
                node = ManagedProcess(
                    supernode_command(
                        superlink=f"127.0.0.1:{node_port}", data_dir=root / f"site-{site}",
                        state_dir=tmp / "state" / site, cache_dir=tmp / "cache" / site,
                        site_name=site, root_cert=certs.ca_cert if certs else None,
                        auth_key=key, insecure=not certs, port=free_port(),
                        executable=str(BIN / "flower-supernode"),
                    ),
                    log_path=tmp / f"node-{site}.log", env=env,
                )
                procs.append(node)
                start_supernode_until_active(node, timeout=60)
            out = tmp / "run"
            argv = flwr_run_command(".", mode, {"fedmed-config": str(config),
                                                "run-dir": str(out), "rounds": 1}, stream=False)
            subprocess.run([str(BIN / "flwr"), *argv[1:]], env=env, cwd=APP, check=True,
                           capture_output=True, timeout=120)
            deadline = time.monotonic() + 300
            while not (out / "summary.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.5)
            if not (out / "summary.json").is_file():
                raise RuntimeError(f"{mode} run did not finish:\n{superlink.log_tail()}")
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
        for tls in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the --insecure warning is expected here
                method, data = _one_round(root, config, tls=tls)
            captured["tls" if tls else "insecure"] = data
            methods["tls" if tls else "insecure"] = method
    hits = {k: sum(v.count(w) for w in windows) for k, v in captured.items()}
    detail = (
        f"one FedAvg round, 2 SuperNodes, U-Net (4, 8, 16); {len(windows)} windows of "
        f"{WINDOW} bytes from the .npy payloads of the round-1 global weights; capture: "
        f"{methods['tls']}"
    )
    extra = {"bytes": {k: len(v) for k, v in captured.items()}, "hits": hits}
    return [
        Figure(NAME, "weight_windows_seen_under_tls", hits["tls"], "matches", "0",
               hits["tls"] == 0, detail, extra),
        Figure(NAME, "weight_windows_seen_insecure_control", hits["insecure"], "matches",
               "> 0 (positive control)", hits["insecure"] > 0,
               f"same round with --insecure (plain HTTP); {len(captured['insecure']):,} bytes",
               extra),
        Figure(NAME, "bytes_captured_under_tls", len(captured["tls"]), "bytes", "> 0",
               len(captured["tls"]) > 0, "everything to/from the SuperLink port", extra),
    ]


if __name__ == "__main__":
    for fig in run(quick="--quick" in sys.argv):
        print(json.dumps(fig.as_dict(), indent=2))
