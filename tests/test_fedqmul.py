"""Federated Q-MUL on the devices' own state (issue 15, items 4 and 7): the forget samples never leave the devices.

A fleet of three devices (fleet/devices.py: each a DeviceState of its own .npz, the server's run trained with
provenance) first runs a head-only model from the server (central Q-MUL of one request, exported with its
features.onnx and installed into every device's state dir, as a rollout does). Then devices file class
requests, the server acknowledges them, and ``coordinator.unlearn_federated`` runs the ``FedQMul`` strategy
through the in-process Grid (Flower's serialization, the real ClientApp). The server's run directory is moved
away while any device code runs, so a device that read it would fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from edge_qmul.devices.state import DeviceState
from edge_qmul.federated import fedqmul
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import unlearn_federated
from edge_qmul.federated.receive import receive
from edge_qmul.federated.strategy import LOCAL_EPOCHS, model_spec, trained_by_device
from fleet.devices import Fleet, copy_fleet, make_fleet
from fleet.inprocess import NODE, LocalGrid
from flwr.app import ArrayRecord, Message, MessageType

from edge_qmul import pipeline, quant
from edge_qmul.config import method_config
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run

CLASS = 3


@pytest.fixture(autouse=True)
def _flower(flower_process: None) -> None:
    """Every test here runs as a Flower process would (see conftest.flower_process)."""


def _file(state_dir: Path, run: Path, **selection: object) -> str:
    """A device files a request; the server records and answers it; the device marks the answer (an intake)."""
    with DeviceState.open(state_dir) as d:
        filed = d.forget(**selection)  # type: ignore[arg-type]
        entries = [e for e in d.pending() if e["request_id"] == filed.request_id]
        (answer,) = receive(run, entries)
        assert answer.status == "acknowledged", answer.reason
        d.mark(filed.request_id, "acknowledged")
    return filed.request_id


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, str]:
    """The fleet, running model V1: central Q-MUL of one request of device 2, exported with features.onnx and
    installed on every device (what a rollout leaves in a device's state dir). Returns (fleet, V1)."""
    from edge_qmul.export.stage import export_run

    root = tmp_path_factory.mktemp("fedqmul")
    fleet = make_fleet(root / "fleet", 3, train=400, held_out=100, epochs=4)
    rid = _file(fleet.states[2], fleet.run, hashes=fleet.trained[2][:3])
    pipeline.run_unlearn(fleet.run, method_config("qmul"), quiet=True)
    export_run(fleet.run, "qmul")
    run = Run(fleet.run)
    version = run.model_version()
    with Ledger(run.path("ledger")) as ledger:
        ledger.mark_honoured([rid], version)
    shipped = root / "shipped"  # the extracted bundle's model files
    shipped.mkdir()
    for key in ("int8_onnx", "features_onnx"):
        shutil.copy(run.path(key), shipped / run.path(key).name)
    for state in fleet.states:
        with DeviceState.open(state) as d:
            d.install_model(version, shipped)
            if d.device_id == fleet.device_ids[2]:
                d.mark(rid, "honoured", model_version=version)
    return fleet, version


class HiddenRunGrid(LocalGrid):
    """The in-process grid with the server's run directory moved away while the devices handle messages."""

    def __init__(self, run: Path, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.run_dir = run
        self.device_messages = 0

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        away = self.run_dir.with_name(self.run_dir.name + ".away")
        os.rename(self.run_dir, away)
        try:
            self.device_messages += len(messages)
            return super().push_messages(messages)
        finally:
            os.rename(away, self.run_dir)


def _grid(fleet: Fleet, **kwargs: object) -> HiddenRunGrid:
    nodes = {NODE + i: {"state-dir": str(s)} for i, s in enumerate(fleet.states)}
    return HiddenRunGrid(fleet.run, nodes, {"run-dir": str(fleet.run), "mode": "federated", "num-clients": 3},
                         **kwargs)


def _cfg(fleet: Fleet) -> FederatedConfig:
    return FederatedConfig.from_run_config({"run-dir": str(fleet.run), "mode": "federated", "num-clients": 3,
                                            "reply-timeout": 600.0})


def _participants(fleet: Fleet) -> dict[int, str]:
    return {NODE + i: d for i, d in enumerate(fleet.device_ids)}


def test_a_federated_round_forgets_on_the_devices_without_the_run_dir(fleet: tuple[Fleet, str],
                                                                      tmp_path: Path) -> None:
    f, v1 = copy_fleet(fleet[0], tmp_path), fleet[1]
    new = [_file(s, f.run, label=CLASS) for s in f.states]  # every device forgets its samples of one class
    grid = _grid(f)
    version, honoured = unlearn_federated(grid, _cfg(f), _participants(f))
    assert version is not None and version.startswith("fedqmul-") and honoured == len(new)
    assert grid.device_messages == 3 * (2 * 5 + 1)  # 5 epochs: evaluate + train each, and the final evaluate
    with Ledger(Run(f.run).path("ledger")) as ledger:
        assert {r.request_id: r.honoured_by for r in ledger.requests() if r.request_id in new} == dict.fromkeys(
            new, version)
    log = Run(f.run).read_json("result_log", method="fedqmul")[0]["log"]  # type: ignore[index]
    assert log["features_version"] == v1 and len(log["rounds"]) == 5 and log["devices"] == 3
    # measured on the devices: the forget samples' accuracy falls over the rounds, the retained samples' holds
    first, final = log["rounds"][0], log["final"]
    assert final["forget_acc"] < first["forget_acc"] - 50 and final["retain_acc"] > first["retain_acc"] - 5
    # and on the server's copy (FA over the whole forget set, RA over the retained training samples)
    report = pipeline.evaluate(f.run, ["fedqmul"])
    none, fed = report.methods["none"], report.methods["fedqmul"]
    assert fed["FA"] < none["FA"] - 50 and fed["RA"] > none["RA"] - 5 and fed["TA"] > none["TA"] - 15
    # each device retained only its samples in the server's training split (not the 10% the server validates on)
    retained = 0
    for state, trained in zip(f.states, f.trained, strict=True):
        with DeviceState.open(state) as d:
            retained += len(set(trained) - set(d.covered()))
    assert log["final"]["n_retain"] == retained and log["retain"] == "trained" and log["local_epochs"] == LOCAL_EPOCHS
    # each device cached the features of its own samples, keyed by the features.onnx it ran
    for state in f.states:
        (cache,) = (state / fedqmul.CACHE_DIR).glob("features-*.npz")
        assert cache.stat().st_size > 0


def _evaluate_message(f: Fleet, version: str, node: int, **change: object) -> Message:
    q = pipeline.load_quantized(f.run)
    head = quant.split_at_classifier(q.qat, q.model_cfg.head)[1]
    spec = fedqmul.RoundSpec(device_id=f.device_ids[node - NODE], request_ids=(), model_version=version,
                             model=model_spec(Run(f.run), q), unlearn_config=fedqmul.config_json(
                                 method_config("qmul", {"layers": "classifier"})),  # type: ignore[arg-type]
                             epoch=0, seed=0)
    spec = fedqmul.RoundSpec(**{**spec.__dict__, **change})
    content = fedqmul.round_content(ArrayRecord(torch_state_dict=fedqmul.state_of(head)), spec, 1)
    return Message(content, node, MessageType.EVALUATE)


def test_a_device_refuses_a_round_about_requests_models_or_devices_not_its_own(fleet: tuple[Fleet, str],
                                                                                tmp_path: Path) -> None:
    f, v1 = copy_fleet(fleet[0], tmp_path), fleet[1]
    theirs = _file(f.states[1], f.run, hashes=f.trained[1][:2])
    mine = _file(f.states[0], f.run, hashes=f.trained[0][:2])
    with DeviceState.open(f.states[0]) as d:
        unsent = d.forget(hashes=f.trained[0][2:4]).request_id  # queued, never acknowledged
    grid = _grid(f)
    cases = {
        "never filed": {"request_ids": ("0" * 32,)},
        "never filed ": {"request_ids": (theirs,)},  # another device's real request
        "not acknowledged": {"request_ids": (unsent,)},
        "does not run model": {"model_version": "qmul-000000000000"},
        "the server sent this round to device": {"device_id": f.device_ids[1]},
    }
    for expected, change in cases.items():
        (reply,) = grid.send_and_receive([_evaluate_message(f, v1, NODE, **change)])
        assert reply.has_error() and expected.strip() in reply.error.reason, (expected, reply.error.reason)
    (reply,) = grid.send_and_receive([_evaluate_message(f, v1, NODE, request_ids=(mine,))])
    assert not reply.has_error()
    _, stats, _ = fedqmul.read_reply(reply.content, fedqmul.STAT_KEYS, train=False)
    assert stats["n-forget"] == 2 and stats["n-retain"] > 300 and stats["f-samples"] == 2


def test_a_device_retains_only_what_the_server_trained_on(fleet: tuple[Fleet, str], tmp_path: Path) -> None:
    """The server names each device's samples in its training split (8-byte content id prefixes, from its own
    provenance and split); the device's retain set is those minus its forget set. Without them (a server with no
    provenance, or retain="contributed") it is every contributed sample."""
    f, v1 = copy_fleet(fleet[0], tmp_path), fleet[1]
    named = trained_by_device(Run(f.run), f.device_ids)
    for device, trained in zip(f.device_ids, f.trained, strict=True):
        chunks = {named[device][i:i + fedqmul.PREFIX] for i in range(0, len(named[device]), fedqmul.PREFIX)}
        assert chunks == {bytes.fromhex(h[:16]) for h in trained} and len(named[device]) == 8 * len(trained)
    mine = _file(f.states[0], f.run, hashes=f.trained[0][:2])
    with DeviceState.open(f.states[0]) as d:
        contributed = len(d.contributed_pool())
    assert contributed > len(f.trained[0])  # the server kept some of them for validation
    grid = _grid(f)
    for trained, retained in ((None, contributed - 2), (named[f.device_ids[0]], len(f.trained[0]) - 2)):
        (reply,) = grid.send_and_receive([_evaluate_message(f, v1, NODE, request_ids=(mine,), trained=trained)])
        assert not reply.has_error(), reply.error.reason
        _, stats, _ = fedqmul.read_reply(reply.content, fedqmul.STAT_KEYS, train=False)
        assert stats["n-forget"] == 2 and stats["n-retain"] == retained
    # a malformed list of trained samples, or no local epoch, is refused
    bad = _evaluate_message(f, v1, NODE, request_ids=(mine,), trained=b"\x00" * 8)
    bad.content[fedqmul.TRAINED] = ArrayRecord(numpy_ndarrays=[np.zeros(5, np.uint8)])
    for message, expected in ((bad, "trained"), (_evaluate_message(f, v1, NODE, local_epochs=0), "local-epochs")):
        (reply,) = grid.send_and_receive([message])
        assert reply.has_error() and expected in reply.error.reason, reply.error.reason


def test_a_device_runs_the_local_epochs_a_round_asks_for(fleet: tuple[Fleet, str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """local_epochs passes over the device's samples in one train round, each starting with its similar labels."""
    f, v1 = copy_fleet(fleet[0], tmp_path), fleet[1]
    mine = _file(f.states[0], f.run, hashes=f.trained[0][:4])
    epochs: list[int] = []
    begin = fedqmul._RoundQMul.begin_epoch

    def counting(self: fedqmul._RoundQMul, ctx: object, epoch: int) -> dict[str, float]:
        epochs.append(epoch)
        return begin(self, ctx, epoch)  # type: ignore[arg-type]

    monkeypatch.setattr(fedqmul._RoundQMul, "begin_epoch", counting)
    message = _evaluate_message(f, v1, NODE, request_ids=(mine,), w_f=0.1, w_r=0.9, lr=0.1, local_epochs=3)
    state, spec = fedqmul.read_round(message.content)
    with DeviceState.open(f.states[0]) as d:
        metrics, new = fedqmul.device_round(d, state, spec, train=True)
    assert epochs == [0, 1, 2] and new is not None and metrics["num-examples"] > 300


def test_the_requests_stay_pending_when_a_device_holding_forget_samples_is_missing(fleet: tuple[Fleet, str],
                                                                                     tmp_path: Path) -> None:
    f = copy_fleet(fleet[0], tmp_path)
    new = [_file(s, f.run, hashes=h[:5]) for s, h in zip(f.states, f.trained, strict=True)]
    absent = _participants(f)
    absent.pop(NODE + 1)
    assert unlearn_federated(_grid(f), _cfg(f), absent) == (None, 0)
    # a holder that stops answering in the middle (its train messages are lost)
    dropping = _grid(f, drop=lambda m: m.metadata.dst_node_id == NODE + 1 and m.metadata.message_type == "train")
    assert unlearn_federated(dropping, _cfg(f), _participants(f)) == (None, 0)
    assert dropping.device_messages > 0  # it did start
    # a request the operator filed on the server: its samples are on no device, so no federated round starts
    pipeline.forget(f.run, ids=pipeline.load_run_data(f.run).split.train[:2])
    idle = _grid(f)
    assert unlearn_federated(idle, _cfg(f), _participants(f)) == (None, 0) and idle.device_messages == 0
    with Ledger(Run(f.run).path("ledger")) as ledger:
        assert all(r.honoured_by is None for r in ledger.requests() if r.request_id in new)
    assert not Run(f.run).exists("result", method="fedqmul")


_BLOCK = """
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError, find_spec says None
"""


def test_the_device_side_runs_with_the_federated_extra_only(fleet: tuple[Fleet, str], tmp_path: Path) -> None:
    """A board installs edge-qmul[federated] (the device extra, torch, rich, Pillow): a train round runs with
    onnx, scikit-learn, matplotlib and scipy unimportable."""
    import json
    import subprocess
    import sys

    import torch

    f, v1 = copy_fleet(fleet[0], tmp_path), fleet[1]
    mine = _file(f.states[0], f.run, hashes=f.trained[0][:4])
    q = pipeline.load_quantized(f.run)
    head = quant.split_at_classifier(q.qat, q.model_cfg.head)[1]
    spec = fedqmul.RoundSpec(device_id=f.device_ids[0], request_ids=(mine,), model_version=v1,
                             model=model_spec(Run(f.run), q), unlearn_config=fedqmul.config_json(
                                 method_config("qmul", {"layers": "classifier"})),  # type: ignore[arg-type]
                             epoch=0, seed=0, w_f=0.1, w_r=0.9, lr=0.1)
    torch.save({"state": fedqmul.state_of(head), "spec": spec.__dict__}, tmp_path / "round.pt")
    blocked = ["onnx", "sklearn", "matplotlib", "scipy"]
    script = _BLOCK.format(BLOCKED=blocked) + f"""
import json, torch
from edge_qmul.devices.state import DeviceState
from edge_qmul.federated import fedqmul
msg = torch.load({str(tmp_path / "round.pt")!r}, weights_only=True)
with DeviceState.open({str(f.states[0])!r}) as state:
    metrics, new = fedqmul.device_round(state, msg["state"], fedqmul.RoundSpec(**msg["spec"]), train=True)
print(json.dumps({{"metrics": metrics, "keys": sorted(new), "loaded": sorted(m for m, v in sys.modules.items()
                  if m.split(".")[0] in {blocked!r} and v is not None)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["metrics"]["num-examples"] > 300
    assert result["keys"] == sorted(fedqmul.state_of(head))
