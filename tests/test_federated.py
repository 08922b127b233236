"""Fast tests of the federated forget-request path on the devices' own state: the messages, the device's
handlers, and whole rounds through an in-process Grid that passes every message through Flower's real
serialization. Every device is a DeviceState (``edge-qmul device init`` of its own .npz, fleet/devices.py);
the server's run was trained with provenance naming each device's contributed samples.

The real deployment (SuperLink + SuperNodes + `flwr run`) is in test_federated_deploy.py.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import pytest
from edge_qmul.devices.state import DeviceState
from edge_qmul.federated import client_app, messages
from edge_qmul.federated.config import DeviceConfig, FederatedConfig
from edge_qmul.federated.coordinator import RoundSummary, run_round
from edge_qmul.federated.messages import ProtocolError
from fleet import faults as fleet_faults
from fleet.devices import Fleet, copy_fleet, make_fleet
from fleet.faults import EXPECTED_FAULT_ANSWERS, fault_answers
from fleet.inprocess import NODE, LocalGrid, local_grid, wire
from flwr.app import ConfigRecord, Message, RecordDict

from edge_qmul.errors import ConfigError, UnlearningError
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run

NOW = 1_800_000_000


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _flower(flower_process: None) -> None:
    """Every test here runs as a Flower process would (see conftest.flower_process)."""


@pytest.fixture(scope="module")
def fleet_template(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Three devices (300 contributed + 60 held-out digits each) and the server run trained on their samples."""
    return make_fleet(tmp_path_factory.mktemp("fleet"), 3, train=300, held_out=60)


@pytest.fixture
def fleet(fleet_template: Fleet, tmp_path: Path) -> Fleet:
    return copy_fleet(fleet_template, tmp_path / "fleet")


def file_samples(fleet: Fleet, i: int, k: int = 2, m: int = 3, start: int = 0) -> list[str]:
    """Device ``i`` files ``k`` requests of ``m`` of its trained samples each; their request ids."""
    with DeviceState.open(fleet.states[i]) as d:
        return [d.forget(hashes=fleet.trained[i][start + j * m:start + (j + 1) * m]).request_id for j in range(k)]


def statuses(state: Path) -> dict[str, str]:
    with DeviceState.open(state) as d:
        return {r.request_id: r.status for r in d.requests()}


def requests(state: Path) -> dict[str, Any]:
    with DeviceState.open(state) as d:
        return {r.request_id: r for r in d.requests()}


def grid_of(fleet: Fleet, run_config: dict[str, object] | None = None, **kw: Any) -> LocalGrid:
    return local_grid(fleet.run, fleet.states, {"mode": "intake", **(run_config or {})}, **kw)


def round_of(grid: LocalGrid, flower_run_id: int = 0) -> RoundSummary:
    return run_round(grid, FederatedConfig.from_run_config(grid.contexts[NODE].run_config),
                     flower_run_id=flower_run_id)


def ledger_rows(fleet: Fleet) -> dict[str, Any]:
    with Ledger(Run(fleet.run).path("ledger")) as ledger:
        return {r.request_id: r for r in ledger.requests()}


# ---------------------------------------------------------------------------------------------------
# Messages and configuration
# ---------------------------------------------------------------------------------------------------


def test_messages_survive_flower_serialization() -> None:
    entries = [{"request_id": "a" * 32, "payload": '{"x":1}', "signature": "00ff"},
               {"request_id": "b" * 32, "payload": '{"y":2}', "signature": "aa"}]
    sent = wire(Message(messages.entries_to_content("d" * 64, entries, ["c" * 32]), 5, messages.QUERY_FORGET))
    assert messages.content_to_entries(sent.content) == ("d" * 64, entries, ["c" * 32])
    empty = wire(Message(messages.entries_to_content("d" * 64, []), 5, messages.QUERY_FORGET))
    assert messages.content_to_entries(empty.content) == ("d" * 64, [], [])
    answers = [("a" * 32, "acknowledged", ""), ("b" * 32, "refused", "not-owner: not yours")]
    acks = wire(Message(messages.answers_to_content(answers), 5, messages.QUERY_ACK))
    assert messages.content_to_answers(acks.content) == answers
    receipt = wire(Message(messages.receipt_to_content({"a": "qmul-1", "b": "qmul-2"}), 5, messages.QUERY_RECEIPT))
    assert messages.content_to_receipt(receipt.content) == {"a": "qmul-1", "b": "qmul-2"}
    with pytest.raises(ProtocolError, match="differ in length"):
        messages.content_to_entries(RecordDict({"forget-batch": ConfigRecord({
            "device-id": "d", "request-ids": ["a"], "payloads": ["x"]})}))
    with pytest.raises(ProtocolError, match="missing 'device-id'"):
        messages.content_to_entries(RecordDict({"forget-batch": ConfigRecord({"payloads": ["x"]})}))
    with pytest.raises(ProtocolError, match="status"):
        messages.content_to_answers(RecordDict({"forget-ack": ConfigRecord({
            "count": 1, "request-id": ["a"], "status": ["maybe"], "reason": [""]})}))


def test_run_and_node_config_reject_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    cfg = FederatedConfig.from_run_config({"run-dir": run, "num-clients": 4, "reply-timeout": 5})
    assert cfg.num_clients == 4 and cfg.reply_timeout == 5.0
    with pytest.raises(ConfigError, match="(?s)unknown key.*num-client.*valid keys"):
        FederatedConfig.from_run_config({"run-dir": run, "num-client": 4})
    with pytest.raises(ConfigError, match="absolute"):
        FederatedConfig.from_run_config({"run-dir": "runs/x"})
    with pytest.raises(ConfigError, match="mode"):
        FederatedConfig.from_run_config({"run-dir": run, "mode": "gossip"})
    with pytest.raises(ConfigError, match="must be of type int"):
        FederatedConfig.from_run_config({"run-dir": run, "num-clients": True})
    assert FederatedConfig.from_run_config({"run-dir": run, "local-epochs": 2}).local_epochs == 2
    with pytest.raises(ConfigError, match="local-epochs=-1 must be >= 0"):
        FederatedConfig.from_run_config({"run-dir": run, "local-epochs": -1})
    # the keys of the old generated-request flow are gone
    for old in ("leave-partitions", "requests-per-client", "key-file", "max-request-age"):
        with pytest.raises(ConfigError, match="unknown key"):
            FederatedConfig.from_run_config({"run-dir": run, old: "0"})
    with pytest.raises(ConfigError, match="state-dir='rel' must be an absolute path"):
        DeviceConfig.from_node_config({"state-dir": "rel"})


def test_a_device_finds_its_state_from_state_dir_or_the_simulation_state_root(tmp_path: Path) -> None:
    assert DeviceConfig.from_node_config({"state-dir": "/s/d0"}).state_path({}) == Path("/s/d0")
    sim = DeviceConfig.from_node_config({"partition-id": 7, "num-partitions": 1000})
    assert sim.state_path({"state-root": "/states", "run-dir": "/srv/run"}) == Path("/states/device-7")
    assert DeviceConfig.from_node_config({"partition-id": 2, "state-root": "/n"}).state_path({}) == Path("/n/device-2")
    with pytest.raises(ConfigError, match="no state-dir") as err:
        DeviceConfig.from_node_config({"partition-id": 0, "num-partitions": 3}).state_path({"run-dir": "/srv/run"})
    assert "edge-qmul device init --state DIR" in str(err.value.fix) and "state-root" in str(err.value.fix)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")  # flwr's FAB builder uses a deprecated API
def test_fab_bundles_only_the_app_config_and_federated_sources() -> None:
    """What `flwr run <repo>` ships: no .venv, runs/ or core package copy (which would shadow the installed one)."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(Path(__file__).parents[1])
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert {"pyproject.toml", "federated/server_app.py", "federated/client_app.py"} <= set(names)
    assert all(n in ("pyproject.toml", "README.md", ".info/CONTENT") or n.startswith("federated/") for n in names)
    assert len(fab) < 512 * 1024


def test_pyproject_run_config_matches_the_app(tmp_path: Path) -> None:
    """Every key in [tool.flwr.app.config] is one the app reads, and the defaults agree."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "edge_qmul.federated.server_app:app",
                                 "clientapp": "edge_qmul.federated.client_app:app"}
    run = str(tmp_path / "run")
    cfg = FederatedConfig.from_run_config({**app["config"], "run-dir": run})
    assert cfg == FederatedConfig(run_dir=run)


def test_fault_injection_is_not_in_the_production_app(fleet: Fleet) -> None:
    """The production device config and run config have no fault switch (faults live in tests/fleet)."""
    with pytest.raises(ConfigError, match="unknown key"):
        DeviceConfig.from_node_config({"state-dir": "/s", "faults": "requests"})
    with pytest.raises(ConfigError, match="unknown key"):
        FederatedConfig.from_run_config({"run-dir": str(fleet.run), "inject-faults": True})
    # the test ClientApp refuses a fault it does not know instead of silently behaving
    grid = grid_of(fleet, app=fleet_faults.app, node_config={"faults": "requests,typo"})
    reply = grid.send_and_receive([Message(messages.forget_query(NOW), NODE, messages.QUERY_FORGET)])
    assert reply[0].has_error() and "unknown fault(s) typo" in reply[0].error.reason


# ---------------------------------------------------------------------------------------------------
# The device's handlers: its own queue, nothing else
# ---------------------------------------------------------------------------------------------------


def test_the_forget_reply_is_the_signed_queue_marked_sent_after_it_is_built(fleet: Fleet) -> None:
    rids = file_samples(fleet, 0)
    grid = grid_of(fleet)
    (reply,) = grid.send_and_receive([Message(messages.forget_query(NOW), NODE, messages.QUERY_FORGET)])
    device_id, entries, awaiting = messages.content_to_entries(reply.content)
    assert device_id == fleet.device_ids[0] and awaiting == []
    with DeviceState.open(fleet.states[0]) as d:
        assert [e["request_id"] for e in entries] == rids
        assert entries == d.pending()  # exactly the stored bytes (sent requests stay unanswered: re-sent)
    assert set(statuses(fleet.states[0]).values()) == {"sent"}


def test_the_device_applies_answers_and_receipts_and_ignores_what_is_not_its_own(fleet: Fleet) -> None:
    a, b = file_samples(fleet, 1)
    with DeviceState.open(fleet.states[1]) as d:
        counts = client_app.settle(d, [(a, "acknowledged", ""), (b, "refused", "not-owner: not yours"),
                                       ("f" * 32, "acknowledged", "")])
        assert counts == {"acknowledged": 1, "refused": 1, "ignored": 1}
        assert client_app.record_receipts(d, {a: "qmul-abc", b: "qmul-abc", "e" * 32: "qmul-abc"}) == \
            {"receipts": 1, "ignored": 2}  # a refusal is final; an unknown id is not this device's
        got = {r.request_id: r for r in d.requests()}
    assert (got[a].status, got[a].model_version) == ("honoured", "qmul-abc")
    assert (got[b].status, got[b].reason) == ("refused", "not-owner: not yours")


# ---------------------------------------------------------------------------------------------------
# Whole rounds through the in-process grid (intake mode: no unlearning)
# ---------------------------------------------------------------------------------------------------


def test_round_records_genuine_requests_and_refuses_forged_mutated_conflicting(fleet: Fleet) -> None:
    """Each device files two sample requests (device 0 also a class, device 1 a leave request) and sends, beside
    them, a forged, a mutated, a conflicting, a held-out and a replayed entry (fleet/faults.py)."""
    filed = {i: file_samples(fleet, i) for i in range(3)}
    with DeviceState.open(fleet.states[0]) as d:
        filed[0].append(d.forget(label=4).request_id)
    with DeviceState.open(fleet.states[1]) as d:
        filed[1].append(d.forget(leave=True).request_id)
    grid = grid_of(fleet, app=fleet_faults.app, node_config={"faults": "requests"})
    summary = round_of(grid, flower_run_id=9)
    assert (summary.replied, summary.devices, summary.acked_nodes) == (3, 3, 3)
    assert (summary.accepted, summary.already_recorded) == (8, 3)  # the replayed entries: acknowledged again
    assert summary.refusals == {"bad-signature": 6, "conflict": 3, "not-owner": 3}
    rows = ledger_rows(fleet)
    assert set(rows) == {rid for ids in filed.values() for rid in ids}  # one row per genuine request, no more
    assert {r.kind for r in rows.values()} == {"samples", "client"}  # a class request files its trained samples
    for i in range(3):
        assert {rows[rid].spec["device"] for rid in filed[i]} == {fleet.device_ids[i]}
        assert set(statuses(fleet.states[i]).values()) == {"acknowledged"}
        assert fault_answers(fleet.states[i]) == EXPECTED_FAULT_ANSWERS
    written = json.loads((fleet.run / "federated" / "round-9.json").read_text())
    assert written["accepted"] == 8 and written["model_version"] is None

    again = round_of(grid, flower_run_id=10)
    assert (again.accepted, again.already_recorded) == (0, 0)  # every genuine request was settled
    assert len(ledger_rows(fleet)) == 8


def test_refusals_reach_the_device_with_their_reason(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    with DeviceState.open(fleet.states[2]) as d:
        held = d.forget(hashes=fleet.held_out[2][:2]).request_id  # its own, but never contributed
        ok = d.forget(hashes=fleet.trained[2][:2]).request_id
    with caplog.at_level(logging.INFO, logger="edge_qmul"):
        summary = round_of(grid_of(fleet))
    assert (summary.accepted, summary.refused, summary.refusals) == (1, 1, {"not-owner": 1})
    got = requests(fleet.states[2])
    assert got[ok].status == "acknowledged"
    assert got[held].status == "refused" and "not in the training set" in got[held].reason
    assert list(ledger_rows(fleet)) == [ok]
    # the server's log names the request and the reason code, never a sample's content id
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"refused request {held}" in text and "not-owner" in text
    assert not any(h in text for h in fleet.held_out[2][:2] + fleet.trained[2][:2])


def test_lost_acks_and_dead_nodes_lose_nothing(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    """Node 1 never sees its ack and node 2 is dead after collecting: their requests are recorded anyway, and
    the re-sent requests are acknowledged again without a second ledger row."""
    filed = {i: file_samples(fleet, i) for i in range(3)}

    def drop(msg: Message) -> bool:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        return (node == NODE + 1 and kind == messages.QUERY_ACK) or (node == NODE + 2 and kind != messages.QUERY_FORGET)

    grid = grid_of(fleet, drop=drop)
    with caplog.at_level(logging.WARNING, logger="edge_qmul"):
        summary = round_of(grid)
    assert (summary.accepted, summary.acked_nodes) == (6, 1)
    assert f"node {NODE + 1} gave no usable reply to query.ack" in caplog.text
    assert set(statuses(fleet.states[1]).values()) == {"sent"}  # it never learnt that they were recorded
    assert set(ledger_rows(fleet)) == {rid for ids in filed.values() for rid in ids}
    grid.drop = lambda m: False
    second = round_of(grid)
    assert (second.accepted, second.already_recorded, second.acked_nodes) == (0, 4, 3)
    assert len(ledger_rows(fleet)) == 6
    assert all(set(statuses(s).values()) == {"acknowledged"} for s in fleet.states)


def test_a_device_that_loses_every_ack_resends_and_is_never_filed_twice(fleet: Fleet) -> None:
    rids = file_samples(fleet, 0)
    grid = grid_of(fleet, app=fleet_faults.app)
    grid.contexts[NODE].node_config["faults"] = "lose-acks"
    for expected in ((2, 0), (0, 2), (0, 2)):
        summary = round_of(grid)
        assert (summary.accepted, summary.already_recorded) == expected
        assert set(statuses(fleet.states[0]).values()) == {"sent"}
    del grid.contexts[NODE].node_config["faults"]
    assert round_of(grid).already_recorded == 2
    assert set(statuses(fleet.states[0]).values()) == {"acknowledged"} and set(ledger_rows(fleet)) == set(rids)


def test_failing_and_dead_clients_are_logged_and_left_out(fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        file_samples(fleet, i)
    grid = grid_of(fleet, app=fleet_faults.app)
    grid.contexts[NODE + 1].node_config["faults"] = "dead"
    grid.contexts[NODE + 2].node_config = {"partition-id": 2}  # misconfigured board: no state dir
    with caplog.at_level(logging.WARNING, logger="edge_qmul"):
        summary = round_of(grid)
    assert (summary.nodes, summary.replied, summary.accepted) == (3, 1, 2)
    assert f"node {NODE + 2} answered query.forget with an error: ConfigError" in caplog.text
    assert "has no state-dir" in caplog.text
    assert f"node {NODE + 1} answered query.forget with an error: RuntimeError" in caplog.text
    assert set(statuses(fleet.states[1]).values()) == {"pending"}  # nothing left the dead board


# ---------------------------------------------------------------------------------------------------
# Central mode: the server unlearns what it recorded, then sends receipts
# ---------------------------------------------------------------------------------------------------


def test_central_round_unlearns_marks_honoured_and_sends_receipts(fleet: Fleet) -> None:
    filed = {i: file_samples(fleet, i) for i in (0, 1)}
    with DeviceState.open(fleet.states[1]) as d:
        filed[1].append(d.forget(leave=True).request_id)
    grid = local_grid(fleet.run, fleet.states, {"mode": "central"})
    summary = round_of(grid)
    # the one model version: the digest of the exported int8 ONNX of the new result
    assert summary.model_version == Run(fleet.run).model_version()
    assert summary.model_version.startswith("qmul-")
    assert (summary.accepted, summary.honoured, summary.receipts) == (5, 5, 2)
    rows = ledger_rows(fleet)
    assert {r.honoured_by for r in rows.values()} == {summary.model_version}
    for i in (0, 1):
        got = requests(fleet.states[i])
        assert {rid: (r.status, r.model_version) for rid, r in got.items()} == \
            dict.fromkeys(filed[i], ("honoured", summary.model_version))
    assert requests(fleet.states[2]) == {}  # filed nothing, learns nothing
    # Nothing new filed: no new model, and no receipt is sent twice (no device waits for one).
    again = round_of(grid)
    assert (again.accepted, again.model_version, again.receipts) == (0, None, 0)


def test_receipts_follow_the_device_not_the_node_and_reach_it_after_a_server_crash(fleet: Fleet) -> None:
    """Requests acknowledged in an intake round (the server then crashed before unlearning) are honoured by
    the next central round, and the receipt reaches each device through whichever node it answers on now."""
    filed = {i: file_samples(fleet, i, k=1) for i in range(3)}
    assert round_of(grid_of(fleet)).accepted == 3  # acknowledged; no model yet
    assert all(set(statuses(s).values()) == {"acknowledged"} for s in fleet.states)
    shuffled = local_grid(fleet.run, fleet.states[::-1], {"mode": "central"})  # node ids now map to other devices
    summary = round_of(shuffled)
    assert (summary.accepted, summary.honoured, summary.receipts) == (0, 3, 3)
    for i in range(3):
        got = requests(fleet.states[i])
        assert {rid: r.model_version for rid, r in got.items()} == dict.fromkeys(filed[i], summary.model_version)


# ---------------------------------------------------------------------------------------------------
# Federated Q-MUL: the server-side averaging (the device side and the rounds are in fedqmul's tests)
# ---------------------------------------------------------------------------------------------------


def test_fedavg_and_adaptive_weights(digits: Any) -> None:
    import torch
    from edge_qmul.federated import fedqmul

    from edge_qmul import quant

    head = quant.split_at_classifier(digits.qat())[1]
    a = fedqmul.state_of(head)
    b = {k: v * 3 if v.is_floating_point() else v for k, v in a.items()}
    fedqmul.average_states(head, [(a, 1.0), (b, 3.0)])  # (1 x a + 3 x 3a) / 4 = 2.5a
    out = fedqmul.state_of(head)
    w = next(k for k in a if k.endswith("fc2.weight"))
    assert torch.allclose(out[w], 2.5 * a[w])
    fedqmul.average_states(head, [(a, 1.0)], server_lr=2.0)  # 2.5a + 2 (a - 2.5a) = -0.5a
    assert torch.allclose(head.state_dict()[w], -0.5 * a[w])
    fq = next(m for n, m in head.named_modules() if n.endswith("weight_fake_quant"))
    scale, _ = fq.activation_post_process.calculate_qparams()
    assert torch.equal(fq.scale, scale)  # re-derived from the averaged range
    stats = [{"g-f-sum": 6.0, "f-samples": 2.0, "g-r-sum": 2.0, "r-samples": 2.0},
             {"g-f-sum": 0.0, "f-samples": 0.0, "g-r-sum": 4.0, "r-samples": 4.0}]
    w_f, w_r, gf, gr = fedqmul.adaptive_weights(stats)  # pooled: g_f = 3, g_r = 1
    assert (gf, gr) == (3.0, 1.0) and (w_f, w_r) == (0.25, 0.75)
    # batches count by their size: a device's 10-sample batch (g = 8) against another's 90 samples (g = 4)
    uneven = [{"g-f-sum": 10 * 8.0, "f-samples": 10.0, "g-r-sum": 1.0 * 256, "r-samples": 256.0},
              {"g-f-sum": 90 * 4.0, "f-samples": 90.0, "g-r-sum": 0.0, "r-samples": 0.0}]
    assert fedqmul.adaptive_weights(uneven)[2:] == pytest.approx((4.4, 1.0))
    with pytest.raises(UnlearningError, match="no device reported forget batches"):
        fedqmul.adaptive_weights([stats[1]])
