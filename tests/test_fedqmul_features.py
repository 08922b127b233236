"""Federated Q-MUL refuses an exported model whose features are not the quantized model's (issue 15, item 4).

The devices compute the frozen part with the ``features.onnx`` of the model they run; the server trains the
head of its QAT copy. The two agree only if the exported model changed nothing outside the head. A full-network
result (central Q-MUL with ``layers="all"``) does change it, so the server must not start a federated round on
it: the round would train a head on features that are not the ones the server's copy computes. It refuses with
the version and a fix, and the requests stay pending.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from edge_qmul.devices.state import DeviceState
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.receive import receive
from edge_qmul.federated.strategy import features_version, run_fedqmul
from fleet.devices import make_fleet
from fleet.inprocess import NODE, LocalGrid

from edge_qmul import pipeline
from edge_qmul.config import method_config
from edge_qmul.errors import UnlearningError
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run


@pytest.fixture(autouse=True)
def _flower(flower_process: None) -> None:
    """Every test here runs as a Flower process would (see conftest.flower_process)."""


def _file(state_dir: Path, run: Path, **selection: object) -> str:
    with DeviceState.open(state_dir) as d:
        filed = d.forget(**selection)  # type: ignore[arg-type]
        (answer,) = receive(run, [e for e in d.pending() if e["request_id"] == filed.request_id])
        assert answer.status == "acknowledged", answer.reason
        d.mark(filed.request_id, "acknowledged")
    return filed.request_id


def test_a_full_network_export_is_refused_for_federated_rounds_and_the_requests_stay_pending(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge_qmul.export.stage import export_run

    fleet = make_fleet(tmp_path / "fleet", 2, train=200, held_out=50, epochs=2)
    first = _file(fleet.states[0], fleet.run, hashes=fleet.trained[0][:3])
    pipeline.run_unlearn(fleet.run, method_config("qmul", {"layers": "all", "epochs": 1}), quiet=True)
    export_run(fleet.run, "qmul")
    run = Run(fleet.run)
    version = run.model_version()
    q = pipeline.load_quantized(run)
    with pytest.raises(UnlearningError) as err:
        features_version(run, q)
    assert version in err.value.message and "outside its classifier head" in err.value.message
    assert "head-only" in err.value.fix

    # the coordinator's entry point: refuses before any message goes out, nothing saved, requests pending
    second = _file(fleet.states[1], fleet.run, hashes=fleet.trained[1][:2])
    nodes = {NODE + i: {"state-dir": str(s)} for i, s in enumerate(fleet.states)}
    grid = LocalGrid(nodes, {"run-dir": str(fleet.run), "mode": "federated", "num-clients": 2})
    cfg = FederatedConfig.from_run_config({"run-dir": str(fleet.run), "mode": "federated", "num-clients": 2})
    with caplog.at_level(logging.WARNING):
        assert run_fedqmul(grid, cfg, {NODE + i: d for i, d in enumerate(fleet.device_ids)}) is None
    assert "federated unlearning cannot start" in caplog.text and version in caplog.text
    assert not run.exists("result", method="fedqmul")
    with Ledger(run.path("ledger")) as ledger:
        assert {r.request_id: r.honoured_by for r in ledger.requests()} == {first: None, second: None}
