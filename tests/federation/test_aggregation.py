"""Every strategy's aggregation against a NumPy reference, on real Flower messages.

Flower's strategies (``flwr.serverapp.strategy``) aggregate ``Message`` replies carrying an
``ArrayRecord`` and a ``MetricRecord`` with ``num-examples`` (training cases); the
references are :mod:`tests.support.oracles`. Also: update compression round trips.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)

from fedmed.config import config_from_dict
from fedmed.errors import ConfigError, FederationError
from fedmed.federation.compression import (
    RELATIVE_ERROR_BOUND,
    bfloat16_bits_to_float32,
    compress,
    compression_ratio,
    decompress,
    float32_to_bfloat16_bits,
    payload_bytes,
)
from fedmed.federation.fedbn import FedBN
from fedmed.federation.strategies import (
    build_strategy,
    restore_strategy_state,
    strategy_state,
)
from tests.support import oracles as ref


@pytest.fixture(autouse=True)
def server_task_identity() -> Any:
    """The identity a ServerApp process has (Flower sets it before running the app)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


SHAPES = {"enc.conv.weight": (4, 2, 3), "enc.conv.bias": (4,), "norm.weight": (4,), "head": (3, 3)}
NORM = {"norm.weight"}


def _site_weights(rng: np.random.Generator, n: int) -> list[dict[str, np.ndarray]]:
    return [
        {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)
    ]


def _replies(updates: list[dict[str, np.ndarray]], cases: list[int]) -> list[Message]:
    """Real train instructions and the sites' replies to them."""
    out = []
    for node, (w, n) in enumerate(zip(updates, cases, strict=True), start=1):
        instruction = Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            dst_node_id=node, message_type=MessageType.TRAIN,
        )
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in w.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": float(node)}),
        })
        out.append(Message(content, reply_to=instruction))
    return out


def _np(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None
    return {k: a.numpy() for k, a in record.items()}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, Any], rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-6, err_msg=k)


def _cfg(**federation: Any) -> Any:
    return config_from_dict({
        "modalities": ["T1"], "labels": {0: "bg", 1: "fg"},
        "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
        "federation": federation,
    })


CASES = [2, 7, 3]


@pytest.mark.parametrize("cls", [FedAvg, FedProx])
def test_fedavg_and_fedprox_weight_by_cases(cls: type) -> None:
    updates = _site_weights(np.random.default_rng(1), 3)
    arrays, metrics = cls().aggregate_train(1, _replies(updates, CASES))
    _assert_close(_np(arrays), ref.weighted_mean(updates, CASES))
    # Metrics are weighted by cases too (loss of site i is i).
    assert metrics is not None
    assert metrics["train-loss"] == pytest.approx((1 * 2 + 2 * 7 + 3 * 3) / 12)
    # Not an unweighted mean: the case counts matter.
    plain = ref.weighted_mean(updates, [1, 1, 1])
    assert not np.allclose(_np(arrays)["head"], plain["head"])


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_match_hand_computed_steps(name: str) -> None:
    rng = np.random.default_rng(2)
    cfg = _cfg(strategy=name, server_learning_rate=0.05, server_beta_1=0.8,
               server_beta_2=0.95, server_tau=1e-2)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedAdam if name == "fedadam" else FedYogi)
    params = {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2}
    current = _site_weights(rng, 1)[0]
    m = v = None
    for server_round in (1, 2):
        updates = _site_weights(rng, 3)
        # What configure_train records: the global weights sent this round.
        strategy.current_arrays = {k: x.copy() for k, x in current.items()}  # type: ignore[attr-defined]
        arrays, _ = strategy.aggregate_train(server_round, _replies(updates, CASES))
        avg = ref.weighted_mean(updates, CASES)
        if name == "fedadam":
            want, m, v = ref.fedadam_step(current, avg, m, v, server_round=server_round, **params)
        else:
            want, m, v = ref.fedyogi_step(current, avg, m, v, **params)
        got = _np(arrays)
        _assert_close(got, want, rtol=1e-4)
        # A server step is not plain averaging.
        assert not np.allclose(got["head"], avg["head"])
        current = got
    state = strategy_state(strategy)
    assert set(state) == {"m_t", "v_t"}
    _assert_close(state["v_t"], v, rtol=1e-4)


def test_fedopt_state_round_trip_changes_the_next_step() -> None:
    rng = np.random.default_rng(3)
    cfg = _cfg(strategy="fedadam")
    first = build_strategy(cfg)
    current = _site_weights(rng, 1)[0]
    first.current_arrays = current  # type: ignore[attr-defined]
    first.aggregate_train(1, _replies(_site_weights(rng, 3), CASES))
    saved = strategy_state(first)

    updates = _site_weights(rng, 3)
    restored, fresh = build_strategy(cfg), build_strategy(cfg)
    restore_strategy_state(restored, saved)
    results = []
    for s in (first, restored, fresh):
        s.current_arrays = current  # type: ignore[attr-defined]
        results.append(_np(s.aggregate_train(2, _replies(updates, CASES))[0]))
    _assert_close(results[1], results[0], rtol=0)
    assert not np.allclose(results[2]["head"], results[0]["head"])


def test_fedmedian_is_elementwise_median() -> None:
    updates = _site_weights(np.random.default_rng(4), 3)
    arrays, _ = FedMedian().aggregate_train(1, _replies(updates, CASES))
    _assert_close(_np(arrays), ref.elementwise_median(updates), rtol=0)


def test_fedtrimmedavg_is_trimmed_mean() -> None:
    updates = _site_weights(np.random.default_rng(5), 5)
    updates[0]["head"][:] = 1e6  # an outlier that the trim removes
    strategy = build_strategy(_cfg(strategy="fedtrimmedavg", trim_beta=0.2))
    assert isinstance(strategy, FedTrimmedAvg) and strategy.beta == 0.2
    arrays, _ = strategy.aggregate_train(1, _replies(updates, [1, 2, 3, 4, 5]))
    want = ref.trimmed_mean(updates, 0.2)
    _assert_close(_np(arrays), want)
    assert np.abs(_np(arrays)["head"]).max() < 10


def test_fedbn_leaves_normalisation_tensors_untouched() -> None:
    rng = np.random.default_rng(6)
    strategy = build_strategy(_cfg(strategy="fedbn"), norm_keys=NORM)
    assert isinstance(strategy, FedBN)
    current = _site_weights(rng, 1)[0]
    strategy.current_arrays = {k: v for k, v in current.items() if k in NORM}
    updates = _site_weights(rng, 3)
    # Sites send only shared tensors; one sends its norm tensor anyway and is ignored.
    sent = [{k: v for k, v in u.items() if k not in NORM} for u in updates]
    sent[1]["norm.weight"] = np.full(4, 99.0, dtype=np.float32)
    arrays, _ = strategy.aggregate_train(1, _replies(sent, CASES))
    got = _np(arrays)
    shared = [{k: v for k, v in u.items() if k not in NORM} for u in updates]
    _assert_close(got, ref.fedbn_merge(ref.weighted_mean(shared, CASES), current, NORM))
    np.testing.assert_array_equal(got["norm.weight"], current["norm.weight"])


def test_build_strategy_maps_the_config() -> None:
    cfg = _cfg(strategy="fedprox", proximal_mu=0.3, min_train_sites=2, min_available_sites=2,
               fraction_train=0.5, evaluate_sites=False)
    s = build_strategy(cfg)
    assert isinstance(s, FedProx)
    assert s.proximal_mu == 0.3
    assert (s.min_train_nodes, s.min_available_nodes, s.fraction_train) == (2, 2, 0.5)
    assert s.fraction_evaluate == 0.0 and s.weighted_by_key == "num-examples"
    adam = build_strategy(cfg, strategy="fedadam")
    assert isinstance(adam, FedAdam) and adam.eta == cfg.federation.server_learning_rate
    assert isinstance(build_strategy(cfg, strategy="fedmedian"), FedMedian)
    with pytest.raises(ConfigError, match="normalisation"):
        build_strategy(cfg, strategy="fedbn")
    with pytest.raises(ConfigError, match="fedavg"):
        build_strategy(cfg, strategy="fedsgd")
    with pytest.raises(ConfigError, match="min_available_sites"):
        build_strategy(_cfg(min_train_sites=2, min_available_sites=1))


# -- compression ------------------------------------------------------------------------------


def _pair(seed: int = 7) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    reference = {
        "w": rng.normal(0, 1, (64, 32)).astype(np.float32),
        "b": rng.normal(0, 0.1, (32,)).astype(np.float32),
        "steps": np.array([5], dtype=np.int64),
    }
    weights = {
        "w": reference["w"] + rng.normal(0, 1e-2, (64, 32)).astype(np.float32),
        "b": reference["b"] + rng.normal(0, 1e-3, (32,)).astype(np.float32),
        "steps": np.array([6], dtype=np.int64),
    }
    return weights, reference


def _through_flower(payload: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.items()})
    return {k: a.numpy() for k, a in record.items()}


@pytest.mark.parametrize("kind", ["none", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("deltas", [True, False])
def test_compression_round_trip_error_bounds(kind: str, deltas: bool) -> None:
    weights, reference = _pair()
    payload, meta = compress(weights, reference, kind, deltas)
    back = decompress(_through_flower(payload), meta, reference)
    assert set(back) == set(weights)
    np.testing.assert_array_equal(back["steps"], weights["steps"])  # integers untouched
    for k in ("w", "b"):
        assert back[k].dtype == np.float32
        err = np.abs(back[k] - weights[k])
        sent = weights[k] - reference[k] if meta["deltas"] else weights[k]
        if kind == "int8":
            bound = np.abs(sent).max() * RELATIVE_ERROR_BOUND["int8"]
        else:
            bound = np.abs(sent) * RELATIVE_ERROR_BOUND[kind]
        # float32 rounding of reference + delta adds at most one ulp of the weight.
        slack = np.abs(weights[k]) * 2.0**-23 * 2
        assert np.all(err <= bound + slack), (kind, deltas, k, float(err.max()))
    if kind == "none":
        for k in weights:
            np.testing.assert_array_equal(back[k], weights[k])


def test_deltas_are_more_precise_than_weights_at_16_bit() -> None:
    weights, reference = _pair()
    errs = {}
    for deltas in (True, False):
        payload, meta = compress(weights, reference, "float16", deltas)
        errs[deltas] = np.abs(decompress(payload, meta, reference)["w"] - weights["w"]).max()
    assert errs[True] < errs[False] / 10


def test_compressed_sizes() -> None:
    weights, reference = _pair()
    floats = weights["w"].nbytes + weights["b"].nbytes
    ints = weights["steps"].nbytes
    for kind, factor in (("none", 1), ("float16", 2), ("bfloat16", 2), ("int8", 4)):
        payload, _ = compress(weights, reference, kind, True)
        assert payload_bytes(payload) == floats // factor + ints, kind
    assert compression_ratio({"w": weights["w"]}, "int8") == pytest.approx(4.0)


def test_bfloat16_rounding_matches_torch() -> None:
    x = np.random.default_rng(8).normal(0, 100, 4096).astype(np.float32)
    x[:4] = [0.0, -0.0, np.inf, -np.inf]
    bits = float32_to_bfloat16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    np.testing.assert_array_equal(
        bfloat16_bits_to_float32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    )


def test_compression_errors_name_the_problem() -> None:
    weights, reference = _pair()
    with pytest.raises(FederationError, match="compression.kind"):
        compress(weights, reference, "zip", True)
    with pytest.raises(FederationError, match="reference"):
        compress(weights, None, "int8", True)
    payload, meta = compress(weights, reference, "int8", True)
    with pytest.raises(FederationError, match="reference"):
        decompress(payload, meta, None)
    meta["scale-keys"] = []
    meta["scales"] = []
    with pytest.raises(FederationError, match="no scale"):
        decompress(payload, meta, reference)
