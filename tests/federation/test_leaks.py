"""Nothing patient-level reaches the coordinator in a whole honest simulated run.

Two sites whose case folders carry identifying names (as real exports often do), one of
them with a broken scan whose file name would reveal a patient in any error text. The
coordinator records every reply it receives; then its run directory, its metrics, its
summary and those replies are searched for any case id, file name or path of any site.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from fedmed.config import load_config
from tests.support.federations import make_federation

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CASE_ID = "MRN{i:04d}_DOE_JOHN_1961"
BROKEN = "MRN9999_SMITH_ANNA_1970"


class RecordingGrid:
    """Forwards to Flower's grid and keeps every reply the coordinator receives."""

    def __init__(self, grid: Any, replies: list[str]) -> None:
        self._grid = grid
        self._replies = replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            if msg.has_error():
                self._replies.append(str(msg.error.reason))
                continue
            for kind in ("config_records", "metric_records", "array_records"):
                for name, rec in getattr(msg.content, kind).items():
                    self._replies.append(f"{name}: " + ", ".join(
                        f"{k}={v if kind != 'array_records' else ''}" for k, v in rec.items()))
        return replies


def test_an_honest_run_leaks_no_case_id_file_name_or_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.serverapp import ServerApp

    from fedmed.federation.client_app import make_client_app
    from fedmed.federation.server_app import serve
    from fedmed.federation.simulation import _simulate, backend_config
    from fedmed.federation.site import simulated_sites

    config = make_federation(tmp_path, sites=("a", "b"), cases=4, case_id=CASE_ID,
                             secure=False, federation={"rounds": 2, "evaluate_sites": True,
                                                       "min_train_sites": 1,
                                                       "min_available_sites": 2})
    # every scan of site b is broken, so its errors (which name the files) happen in every
    # split it touches; one more case carries another identifying name
    broken = tmp_path / "site-b" / BROKEN
    broken.mkdir()
    (broken / "label.nii.gz").write_bytes(gzip.compress(b"nor this"))
    for scan in [broken / "T1.nii.gz", *(tmp_path / "site-b").glob("*/T1.nii.gz")]:
        scan.write_bytes(gzip.compress(b"not a nifti header at all"))
    cfg = load_config(config)
    out = tmp_path / "run"
    replies: list[str] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Any, context: Any) -> None:
        serve(RecordingGrid(grid, replies), {"fedmed-config": str(config), "run-dir": str(out)})

    with caplog.at_level("INFO"):
        _simulate(server, make_client_app(sites=simulated_sites(cfg)), 2, backend_config(cfg),
                  verbose=False)

    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["sites_trained"] for line in lines] == [["a"], ["a"]]
    assert all(line["sites_refused"] == {"b": "site-error"} for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites_refused"] == {"b": {"site-error": 2, "weights-not-global": 2}}
    received = [p.read_text(errors="replace") for p in sorted(out.rglob("*"))
                if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".log", "")]
    received += replies + [r.getMessage() for r in caplog.records
                           if r.name.startswith("fedmed.federation.coordinator")
                           or r.name.startswith("fedmed.federation.server_app")]
    blob = "\n".join(received)
    assert replies and "site-error" in blob  # what was received was searched
    forbidden = ["MRN", "DOE_JOHN", "SMITH_ANNA", ".nii", "label.nii", str(tmp_path / "site-a"),
                 str(tmp_path / "site-b"), "Traceback"]
    hits = {f: blob.count(f) for f in forbidden if f in blob}
    assert hits == {}
