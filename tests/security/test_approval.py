"""Approved app bundles: hashing, the check, the CLI, and the executor's hook into Flower.

The executor's whole path (SuperNode, executor, refusal reply, coordinator record) runs with
real processes in ``tests/federation/test_deployment_e2e.py``; here each piece on its own.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedmed.cli.main import main
from fedmed.errors import PolicyError, RequestRefused, SecurityError
from fedmed.policy import ApprovedApp, SitePolicy, load_policy, write_default_policy
from fedmed.security import executor as executor_module
from fedmed.security.approval import APP_NOT_APPROVED, check_bundle, fab_hash
from fedmed.security.executor import load_executor_settings, task_command
from tests.support.deployment import snapshot_app

CHECKOUT = Path(__file__).resolve().parents[2]
# Flower's bundle builder uses a pathspec API that pathspec deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec.*")


def _policy(*hashes: str) -> SitePolicy:
    return SitePolicy(approved_apps=tuple(
        ApprovedApp(fab_hash=h, approved_by="dpo", approved_at="2026-01-01T00:00:00+00:00")
        for h in hashes
    ))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot_app(CHECKOUT, tmp_path_factory.mktemp("app") / "app")


def test_fab_hash_is_the_hash_flwr_build_and_run_use(app: Path, tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app)
    digest = hashlib.sha256(fab).hexdigest()
    (tmp_path / "app.fab").write_bytes(fab)
    assert fab_hash(app) == digest  # the directory `flwr run DIR` would submit
    assert fab_hash(tmp_path / "app.fab") == digest  # `flwr build`'s file
    assert fab_hash(str(tmp_path / "app.fab")) == digest
    assert fab_hash(fab) == digest
    assert fab_hash(digest.upper()) == digest
    # Deterministic: a copy of the unpacked bundle builds to the same bytes.
    assert fab_hash(snapshot_app(app, tmp_path / "again")) == digest
    with pytest.raises(PolicyError, match="neither"):
        fab_hash("not-a-hash")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="app directory"):
        fab_hash(tmp_path / "empty")


def test_check_bundle_refuses_unapproved_and_misannounced_bundles() -> None:
    content = b"bundle bytes"
    digest = hashlib.sha256(content).hexdigest()
    assert check_bundle(content, digest, _policy(digest)) == digest
    assert check_bundle(content, digest.upper(), _policy(digest)) == digest
    with pytest.raises(RequestRefused) as refused:
        check_bundle(content, digest, _policy("0" * 64))
    assert refused.value.code == APP_NOT_APPROVED == "app-not-approved"
    assert digest in str(refused.value)  # the detail, for the site's own log
    # Approved bytes announced under another hash: Flower would load the app from the
    # folder named after the announced hash, so this is refused too.
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(RequestRefused, match="announced"):
        check_bundle(content, other, _policy(digest, other))
    with pytest.raises(RequestRefused):
        check_bundle(content, digest, SitePolicy())


def test_site_approve_and_approved_cli(
    app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = write_default_policy(tmp_path / "site-policy.yaml")
    assert main(["site", "approved", "--policy", str(policy)]) == 0
    assert "no app bundle is approved" in capsys.readouterr().out
    assert main(["site", "approve", str(app), "--policy", str(policy), "--by", "dpo",
                 "--note", "release 0.1"]) == 0
    (entry,) = load_policy(policy).approved_apps
    assert (entry.fab_hash, entry.approved_by, entry.note) == (fab_hash(app), "dpo",
                                                                 "release 0.1")
    assert entry.approved_at.endswith("+00:00")
    second = "ab" * 32
    assert main(["site", "approve", second, "--policy", str(policy)]) == 0
    assert main(["site", "approved", "--policy", str(policy)]) == 0
    out = capsys.readouterr().out
    assert fab_hash(app) in out and second in out and "dpo" in out
    assert load_policy(policy).is_approved(second)
    # Invalid input: exit code 1 with a message, no traceback.
    assert main(["site", "approve", "nonsense", "--policy", str(policy)]) == 1
    assert main(["site", "approve", second, "--policy", str(policy)]) == 1  # already
    assert main(["site", "approve", second, "--policy", str(tmp_path / "none.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "already approved" in err


def test_executor_settings_and_task_command(tmp_path: Path) -> None:
    policy = write_default_policy(tmp_path / "p.yaml")
    settings = load_executor_settings(policy=policy, insecure=True)
    argv = task_command(settings, 1234)
    assert argv[:5] == [sys.executable, "-m", "fedmed.cli.main", "site", "clientapp"]
    assert argv[argv.index("--parent-pid") + 1] == "1234" and "--insecure" in argv
    assert "--token" not in argv  # the token goes through stdin
    with pytest.raises(SecurityError, match="exactly one"):
        load_executor_settings(policy=policy)
    with pytest.raises(SecurityError, match="--policy"):
        load_executor_settings(policy=tmp_path / "missing.yaml", insecure=True)
    with pytest.raises(SecurityError, match="runtime_api_address"):
        load_executor_settings(policy=policy, insecure=True, runtime_api_address="http://x")


def test_flower_still_pulls_before_it_unpacks_and_imports() -> None:
    """The executor wraps ``pull_task_input``; Flower 1.42 must call it before the rest."""
    from flwr.supernode.runtime import run_clientapp as flower

    source = inspect.getsource(flower.run_clientapp)
    order = [source.index(step) for step in (
        "pull_task_input(client)", "install_from_fab(", "install_app_dependencies(",
        "load_client_app_fn(",
    )]
    assert order == sorted(order), order
    assert callable(flower.push_message) and callable(flower.pull_task_input)


def _pulled(content: bytes, claimed: str) -> tuple[Any, Any, Any, Any]:
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.fab import Fab

    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_message_id"] = "m" * 64
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    run = type("Run", (), {"run_id": 7})()
    return message, context, run, Fab(claimed, content, {})


def test_checked_pull_refuses_before_anything_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.common.constant import ErrorCode
    from flwr.supernode.runtime import run_clientapp as flower

    content = b"a bundle"
    digest = hashlib.sha256(content).hexdigest()
    policy = write_default_policy(tmp_path / "p.yaml")
    pushed: list[Any] = []
    forgotten: list[bool] = []
    from flwr.supercore.task_identity import TaskIdentity

    # What Flower's own pull sets in a task process (Messages need it).
    for name, value in (("_task_id", 3), ("_run_id", 7), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    monkeypatch.setattr(flower, "push_message", lambda c, m, ctx: pushed.append(m))
    monkeypatch.setattr(executor_module, "_forget_installed_fedmed",
                        lambda: forgotten.append(True))
    pull = executor_module._checked_pull(lambda client: _pulled(content, digest), policy)

    with pytest.raises(RequestRefused):
        pull(None)
    (reply,) = pushed
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == APP_NOT_APPROVED  # nothing else leaves the site
    assert not forgotten

    # Approved (the policy is read again for every task): handed on to Flower.
    main(["site", "approve", digest, "--policy", str(policy)])
    message, *_ = pull(None)
    assert message.metadata.message_type == "train" and forgotten == [True]
    assert len(pushed) == 1

    # A policy that cannot be read approves nothing.
    shutil.move(policy, tmp_path / "gone.yaml")
    with pytest.raises(PolicyError):
        pull(None)
    assert pushed[-1].error.reason == APP_NOT_APPROVED


def test_an_approved_bundle_runs_its_own_fedmed(tmp_path: Path) -> None:
    """After the check, ``import fedmed`` finds the bundle's copy, as under flwr-clientapp."""
    bundle = tmp_path / "bundle"
    (bundle / "fedmed").mkdir(parents=True)
    (bundle / "fedmed" / "__init__.py").write_text("FROM_BUNDLE = True\n")
    script = (
        "import sys\n"
        "from fedmed.security import executor\n"  # the check imports the installed fedmed
        "executor._forget_installed_fedmed()\n"
        f"sys.path.insert(0, {str(bundle)!r})\n"  # what Flower does with the bundle
        "import fedmed\n"
        "print(fedmed.__file__, getattr(fedmed, 'FROM_BUNDLE', False))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True, cwd=tmp_path)
    path, flag = done.stdout.split()
    assert Path(path).parent == bundle / "fedmed" and flag == "True"
