"""Fixtures of the federation tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def server_task_identity() -> Any:
    """The identity a ServerApp process has (Flower sets it before running the app)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
