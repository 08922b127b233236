"""The real deployment: flower-superlink + three flower-supernode processes on loopback, the app started with
`flwr run <repo> lb`, the run polled with `flwr list` (ARCHITECTURE.md §8: `flwr run` can exit 0 on a failed run).

Every process runs in its own session and is stopped by its process-group id in a finally block; each
process has its own FLWR_HOME under the test's tmp dir. Run with `pytest -m federated`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_qmul.federated import protocol
from edge_qmul.federated.certs import make_certs
from edge_qmul.federated.store import FleetStore
from fleet.faults import EXPECTED_FAULT_REASONS
from fleet.loopback import BIN, REPO, Deployment

from edge_qmul import pipeline
from edge_qmul.cli import main
from edge_qmul.config import DataConfig, QuantConfig
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run
from edge_qmul.train import TrainConfig

pytestmark = pytest.mark.federated

NODES = 3


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run directory with a float model and its int8 / QAT copies (no requests yet)."""
    run = tmp_path_factory.mktemp("federated") / "trained"
    pipeline.train(run, DataConfig(dataset="digits"), TrainConfig(epochs=3), quiet=True)
    pipeline.quantize(run, QuantConfig(), quiet=True)
    return run


@contextlib.contextmanager
def deployed(root: Path, node_extra: dict[int, str] | None = None) -> Iterator[Deployment]:
    dep = Deployment(root, NODES, node_extra)
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with deployed(tmp_path / "deploy") as dep:
        yield dep


@pytest.fixture
def faulty_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Every device also sends one request of each kind the server must refuse (tests/fleet/faults.py)."""
    with deployed(tmp_path / "deploy", dict.fromkeys(range(NODES), 'faults="requests"')) as dep:
        yield dep


def _report(dep: Deployment, run_id: int, status: str) -> str:
    return f"run {run_id}: {status}\n--- server log ---\n{dep.server_log(run_id)}\n--- superlink ---\n" + dep.tail(
        "superlink"
    )


def test_deployment_records_genuine_requests_and_refuses_the_rest(
    faulty_deployment: Deployment, trained_run: Path, tmp_path: Path
) -> None:
    deployment = faulty_deployment
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    key_file = tmp_path / "keys.json"  # device 2 is pre-registered with a key it does not hold
    key_file.write_text(json.dumps({"2": protocol.public_key_bytes(protocol.generate_key()).hex()}))
    t0 = time.monotonic()
    run_id = deployment.run_app(
        f'run-dir="{run}" key-file="{key_file}" class-partitions="0" leave-partitions="1"', deployment.fault_app()
    )
    status = deployment.wait(run_id)
    elapsed = time.monotonic() - t0
    assert status == "finished:completed", _report(deployment, run_id, status)

    summary = json.loads((run / "federated" / f"round-{run_id}.json").read_text())
    print(f"\nfederated deployment: {elapsed:.1f}s wall; round {json.dumps(summary)}")
    faults = len(EXPECTED_FAULT_REASONS)
    assert (summary["nodes"], summary["replied"], summary["acked_nodes"]) == (NODES, NODES, NODES)
    assert summary["accepted"] == 6 and summary["already_recorded"] == 0
    assert summary["refusals"] == {**{r: 2 for r in EXPECTED_FAULT_REASONS.values()}, "key-mismatch": 2 + faults}

    version = summary["model_version"]
    assert (run / "unlearn" / "qmul" / "result.pt").is_file()
    assert version == Run(run).model_version()  # the digest of the exported int8 ONNX, as bundles cite it
    with Ledger(run / "ledger.sqlite") as ledger:
        rows = ledger.requests()
    assert sorted(r.source for r in rows) == ["device:0"] * 3 + ["device:1"] * 3  # nothing from device 2
    assert {r.kind for r in rows} == {"samples", "class", "client"}
    assert all(r.honoured_by == version for r in rows)
    assert not any("-x-" in r.request_id for r in rows)  # no injected (forged, foreign, ...) request got in
    with FleetStore(run / "ledger.sqlite") as store:
        log_rows = store.intake_log()
        registered = {d.partition_id: d.registered for d in store.devices()}
    assert registered == {0: "tofu", 1: "tofu", 2: "pinned"}
    assert sum(r.outcome == "refused" for r in log_rows) == summary["refused"]

    for i in (0, 1):
        state = deployment.device_state(i)
        assert state["pending"] == [] and state["faults"] == EXPECTED_FAULT_REASONS
        assert state["receipts"] == {r.request_id: version for r in rows if r.source == f"device:{i}"}
    assert set(deployment.device_state(2)["refused"].values()) == {"key-mismatch"}
    pipeline.evaluate(run, ["qmul"])  # the unlearned model loads and is current for this ledger

    server_log = deployment.server_log(run_id)
    assert re.search(r"refused forget request p0-x-other-\w+ from device 0 \(node \d+\): not-owner", server_log)
    assert re.search(r"device 1: registered key \w+ on first contact \(TOFU\)", server_log)
    assert "forget round: 3/3 nodes replied; 6 accepted" in server_log


def test_unregistered_supernode_cannot_take_part(deployment: Deployment, trained_run: Path, tmp_path: Path) -> None:
    """SuperNode authentication: a SuperNode whose key was never registered with `flwr supernode register` (here
    one claiming device 2's partition, over valid TLS) is refused when it activates and exits; the SuperLink
    never lists it and a run reaches only the registered devices. TLS: a SuperNode with a registered key that
    trusts another CA refuses the SuperLink's certificate and never comes online."""
    deployment.start_node(2, name="impostor", register=False)
    code = deployment.procs["impostor"].wait(timeout=120)
    log = deployment.tail("impostor")
    assert code != 0 and "Failed to activate SuperNode" in log and "Exit Code: 305" in log, log
    assert set(deployment.registered_nodes()) == set(deployment.node_ids.values())  # 3 keys, none of its own

    stranger = deployment.register(deployment.node_key("stranger"))
    other_ca = make_certs(tmp_path / "other-ca", hosts=("127.0.0.1",)).ca_cert
    deployment.start_node(1, name="stranger", register=False, root_certificates=other_ca)
    assert deployment.procs["stranger"].wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.tail("stranger"), deployment.tail("stranger")
    assert deployment.registered_nodes()[stranger] == "registered"  # never online

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_id = deployment.run_app(f'run-dir="{run}" mode="intake"')
    status = deployment.wait(run_id)
    assert status == "finished:completed", _report(deployment, run_id, status)
    summary = json.loads((run / "federated" / f"round-{run_id}.json").read_text())
    print(f"\nimpostor exited with {code}; intake round {json.dumps(summary)}")
    assert (summary["nodes"], summary["replied"], summary["accepted"]) == (NODES, NODES, 6)
    assert not deployment.state_dir(2, "impostor").exists()  # no message ever reached it
    assert deployment.device_state(2)["acked"]  # the registered device 2 took part


def test_killed_supernode_loses_nothing_it_was_acknowledged_for(
    deployment: Deployment, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    t0 = time.monotonic()
    run_id = deployment.run_app(f'run-dir="{run}" reply-timeout=15.0')
    # Wait until device 2 has settled its acknowledgement, then kill its SuperNode.
    deadline = time.monotonic() + 240
    while not deployment.device_state(2).get("acked"):
        assert time.monotonic() < deadline, _report(deployment, run_id, "device 2 never acknowledged")
        time.sleep(0.2)
    deployment.kill("node2")
    killed_at = time.monotonic() - t0
    acked = set(deployment.device_state(2)["acked"])
    status = deployment.wait(run_id)
    elapsed = time.monotonic() - t0
    assert status == "finished:completed", _report(deployment, run_id, status)

    summary = json.loads((run / "federated" / f"round-{run_id}.json").read_text())
    print(f"\nnode 2 killed at {killed_at:.1f}s; run finished at {elapsed:.1f}s; round {json.dumps(summary)}")
    assert summary["accepted"] == 6 and summary["receipts"] == NODES - 1
    with Ledger(run / "ledger.sqlite") as ledger:
        rows = {r.request_id: r for r in ledger.requests()}
    assert len(acked) == 2 and acked <= set(rows)
    assert {rows[rid].honoured_by for rid in acked} == {summary["model_version"]}
    assert all(r.honoured_by == summary["model_version"] for r in rows.values())
    # The dead node either never answers or the SuperLink answers for it with an error: logged either way.
    assert re.search(r"node \d+ (gave no usable reply to|answered) query.receipt", deployment.server_log(run_id))


def test_server_killed_after_acknowledging_loses_nothing(
    deployment: Deployment, trained_run: Path, tmp_path: Path
) -> None:
    """SIGKILL the ServerApp between acknowledgement and unlearning; the next run honours every request."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    first = deployment.run_app(f'run-dir="{run}" hold-after-ack=900.0')
    marker = run / "federated" / f"acked-{first}.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline, _report(deployment, first, "no acknowledgement within 240 s")
        time.sleep(0.2)
    pid = int(json.loads(marker.read_text())["pid"])
    # The ServerApp process descends from our SuperLink: ours to kill.
    assert deployment.started(pid) and pid != deployment.procs["superlink"].pid
    os.kill(pid, signal.SIGKILL)
    acked = {rid for i in range(NODES) for rid in deployment.device_state(i)["acked"]}
    with Ledger(run / "ledger.sqlite") as ledger:
        rows = ledger.requests()
    assert len(acked) == 6 and {r.request_id for r in rows} == acked  # every acknowledged request is recorded
    assert all(r.honoured_by is None for r in rows) and not (run / "unlearn").exists()

    second = deployment.run_app(f'run-dir="{run}"')  # the restarted server
    status = deployment.wait(second)
    assert status == "finished:completed", _report(deployment, second, status)
    summary = json.loads((run / "federated" / f"round-{second}.json").read_text())
    print(f"\nserver killed after acknowledging (run {first}); restart: {json.dumps(summary)}")
    assert summary["accepted"] == 0 and summary["honoured"] == 6  # nothing re-filed, all honoured now
    with Ledger(run / "ledger.sqlite") as ledger:
        honoured = {r.request_id: r.honoured_by for r in ledger.requests()}
    assert honoured == dict.fromkeys(acked, summary["model_version"])
    for i in range(NODES):
        assert set(deployment.device_state(i)["receipts"]) == set(deployment.device_state(i)["acked"])


def test_rollout_rolls_back_a_failed_wave_then_ships_a_fixed_model(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waves over real SuperNodes: a broken board fails wave 2, which rolls back; once it is repaired, a
    fixed model reaches every device."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    keys = tmp_path / "keys"
    bundles = []
    pipeline.forget(run, fraction=0.1, seed=0)
    loose = tmp_path / "loose.toml"
    loose.write_text("[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n")
    assert main(["keygen", "--out", str(keys)]) == 0
    for method in ("qmul", "finetune"):
        assert main(["unlearn", "--run", str(run), "--method", method, "--quiet"]) == 0
        assert main(["export", "--run", str(run), "--method", method]) == 0
        assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(loose)]) == 0
        out = tmp_path / f"{method}.tar"
        assert main(["bundle", "--run", str(run), "--device", "x86-server", "--key", str(keys / "signing_key.pem"),
                     "--out", str(out)]) == 0
        bundles.append(out)
    fleet_key = f'fleet-key="{keys / "public_key.hex"}"'
    dep = Deployment(tmp_path / "deploy", NODES, {i: fleet_key for i in range(NODES)})
    dep.node_extra[2] = f'{fleet_key} faults="broken-runtime"'  # runs the test ClientApp (tests/fleet/faults.py)
    try:
        dep.start()
        first = dep.run_app(f'run-dir="{run}" mode="rollout" bundle="{bundles[0]}" waves="33,100"', dep.fault_app())
        status = dep.wait(first)
        assert status == "finished:completed", _report(dep, first, status)
        (summary_path,) = (run / "rollouts").glob(f"*-run{first}.json")
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "rolled-back"
        assert [(w["devices"], w["passed"]) for w in summary["waves"]] == [([0], [0]), ([1, 2], [1])]
        assert summary["waves"][1]["rolled_back"] == [1]
        actives = [dep.device_state(i).get("model", {}).get("active") for i in range(NODES)]
        assert actives == [summary["model_version"], None, None]

        dep.restart_node(2, fleet_key)  # the board's runtime is repaired
        for key, value in dep.env("home-cli").items():  # `edge-qmul rollout` drives the same deployment
            monkeypatch.setenv(key, value)
        code = main(["rollout", "--run", str(run), "--bundle", str(bundles[1]), "--superlink", "lb", "--app",
                     str(REPO), "--waves", "33,66,100", "--flwr", str(BIN / "flwr")])
        assert code == 0, dep.tail("superlink")
        (fixed_path,) = set((run / "rollouts").glob("*.json")) - {summary_path}
        fixed = json.loads(fixed_path.read_text())
        print(f"\nrollout 1: {json.dumps(summary)}\nrollout 2: {json.dumps(fixed)}")
        assert fixed["status"] == "completed" and len(fixed["waves"]) == 3
        assert [dep.device_state(i)["model"]["active"] for i in range(NODES)] == [fixed["model_version"]] * NODES
        assert "wave 2 failed" in dep.server_log(first)
    finally:
        dep.stop()
