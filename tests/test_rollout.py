"""Staged rollout through the in-process Grid (the real ServerApp / ClientApp code and Flower serialization).

The devices are DeviceStates with their own .npz data (fleet/devices.py); each filed two requests, which the
server acknowledged and honoured before the bundles were built. The same flow through a real SuperLink and
SuperNodes is in test_federated_deploy.py.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from edge_qmul.devices.state import DeviceState
from edge_qmul.export.bundle import read_manifest
from edge_qmul.federated import client_app
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import run_rollout_round
from edge_qmul.federated.receive import receive
from edge_qmul.federated.rollout import QUERY_ROLLOUT, RolloutStore, forget_check_level, parse_waves, wave_members
from fleet import faults as fleet_faults
from fleet.devices import Fleet, copy_fleet, make_fleet
from fleet.inprocess import NODE, LocalGrid, local_grid
from flwr.app import ConfigRecord, Message, RecordDict

from edge_qmul.cli import main
from edge_qmul.errors import ConfigError

pytestmark = pytest.mark.usefixtures("flower_process")

LOOSE = "[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n"
FILED = 20  # samples each device asked to forget (two requests of 10)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, Path, Path]:
    """A fleet whose devices each filed two requests (acknowledged), and two signed bundles of the run that
    honours them: qmul, then finetune as the 'fixed' model."""
    tmp = tmp_path_factory.mktemp("rollout")
    fleet = make_fleet(tmp / "fleet", 3, train=300, held_out=60)
    for i, state in enumerate(fleet.states):
        with DeviceState.open(state) as d:
            for j in range(2):
                d.forget(hashes=fleet.trained[i][10 * j:10 * (j + 1)])
            answers = receive(fleet.run, d.pending())
            client_app.settle(d, [(a.request_id, a.status, a.reason) for a in answers])
            assert {r.status for r in d.requests()} == {"acknowledged"}
    (tmp / "loose.toml").write_text(LOOSE)
    bundles = []
    for method in ("qmul", "finetune"):
        run = str(fleet.run)
        assert main(["unlearn", "--run", run, "--method", method, "--quiet"]) == 0
        assert main(["export", "--run", run, "--method", method]) == 0
        assert main(["validate", "--run", run, "--device", "x86-server", "--budgets", str(tmp / "loose.toml"),
                     "--method", method]) == 0
        out = tmp / f"{method}.tar"
        assert main(["bundle", "--run", run, "--device", "x86-server", "--key",
                     str(fleet.keys / "signing_key.pem"), "--out", str(out)]) == 0
        bundles.append(out)
    return fleet, bundles[0], bundles[1]


@pytest.fixture
def fleet(shipped: tuple[Fleet, Path, Path], tmp_path: Path) -> Fleet:
    return copy_fleet(shipped[0], tmp_path / "fleet")


def order(fleet: Fleet) -> list[int]:
    """Device indices in device-id order: the order in which waves take the fleet."""
    return sorted(range(len(fleet.states)), key=lambda i: fleet.device_ids[i])


def grid_for(fleet: Fleet, bundle: Path, waves: str = "33,100", faults: dict[int, str] | None = None,
             drop: object = None) -> LocalGrid:
    """``faults``: device index -> fault of tests/fleet/faults.py (the devices then run its ClientApp)."""
    grid = local_grid(fleet.run, fleet.states, {"mode": "rollout", "bundle": str(bundle), "waves": waves},
                      drop=drop or (lambda m: False),  # type: ignore[arg-type]
                      app=fleet_faults.app if faults else client_app.app)
    for i, fault in (faults or {}).items():
        grid.contexts[NODE + i].node_config[fleet_faults.FAULTS_KEY] = fault
    return grid


def roll(grid: LocalGrid) -> object:
    return run_rollout_round(grid, FederatedConfig.from_run_config(grid.contexts[NODE].run_config))


def active(state: Path) -> str:
    """The model the device runs ("" = none installed by a rollout: its factory model)."""
    with DeviceState.open(state) as d:
        models = d.models()
        return models[0].version if models else ""


def test_waves_are_cumulative_and_validated() -> None:
    assert wave_members([5, 25, 100], 5) == [[0], [0, 1], [0, 1, 2, 3, 4]]  # at least one device per wave
    assert wave_members([33, 100], 3) == [[0], [0, 1, 2]]
    assert wave_members([50, 100], 3) == [[0, 1], [0, 1, 2]]
    for bad in ("5,25", "25,5,100", "0,100", "a,100"):
        with pytest.raises(ConfigError):
            parse_waves(bad)


def test_rollout_reaches_every_device_and_resumes_after_a_crash(shipped: tuple[Fleet, Path, Path],
                                                                 fleet: Fleet) -> None:
    bundle = shipped[1]
    version = read_manifest(bundle)["model_version"]
    first = order(fleet)[0]
    installs: list[int] = []
    crash = {"armed": True}

    def crash_in_wave_two(message: Message) -> bool:
        content = message.content.get("rollout")
        if content is not None and content["phase"] == "install":
            i = message.metadata.dst_node_id - NODE
            if i != first and crash["armed"]:
                crash["armed"] = False
                raise RuntimeError("server crashed")  # the ServerApp dies mid-wave
            installs.append(i)
        return False

    grid = grid_for(fleet, bundle, waves="33,100", drop=crash_in_wave_two)
    with pytest.raises(RuntimeError, match="server crashed"):
        roll(grid)
    with RolloutStore(fleet.run / "rollout.sqlite") as store:
        (state,) = store.all()
        assert (state.status, state.next_wave) == ("running", 1)  # wave 1 recorded as passed
    summary = roll(grid)  # the restarted server resumes at wave 2
    assert summary.status == "completed"  # type: ignore[attr-defined]
    assert installs[0] == first and sorted(installs) == [0, 1, 2]  # wave 1's device was not sent it again
    assert [active(s) for s in fleet.states] == [version] * 3
    with DeviceState.open(fleet.states[first]) as d:
        installed = d.model_dir()
        assert installed is not None and (installed / "model.int8.onnx").is_file()  # in its own state dir
    with RolloutStore(fleet.run / "rollout.sqlite") as store:
        assert {d: r["status"] for d, r in store.devices(state.rollout_id).items()} == \
            dict.fromkeys(fleet.device_ids, "installed")
    assert roll(grid).status == "completed"  # type: ignore[attr-defined]  # a finished rollout is final


def test_failed_wave_rolls_back_then_a_fixed_model_reaches_everyone(shipped: tuple[Fleet, Path, Path],
                                                                     fleet: Fleet) -> None:
    _, bad_run_bundle, fixed = shipped
    one, two, three = order(fleet)
    ids = fleet.device_ids
    # the last device's runtime is broken: wave 2 fails and the other device of wave 2 goes back to its factory
    # model (the bundle was the first model it installed)
    summary = roll(grid_for(fleet, bad_run_bundle, waves="33,100", faults={three: "broken-runtime"}))
    assert summary.status == "rolled-back"  # type: ignore[attr-defined]
    wave = summary.waves[-1]  # type: ignore[attr-defined]
    assert (wave["devices"], wave["passed"], wave["rolled_back"]) == ([ids[two], ids[three]], [ids[two]], [ids[two]])
    first = summary.model_version  # type: ignore[attr-defined]
    assert [active(fleet.states[i]) for i in (one, two, three)] == [first, "", ""]
    with RolloutStore(fleet.run / "rollout.sqlite") as store:
        devices = store.devices(summary.rollout_id)  # type: ignore[attr-defined]
    assert devices[ids[two]]["status"] == "rolled-back" and devices[ids[three]]["status"] == "failed"
    assert "simulated broken runtime" in devices[ids[three]]["reasons"][0]

    # the board is repaired; a fixed model rolls out to every device, replacing the first one where it ran
    grid = grid_for(fleet, fixed, waves="33,66,100")
    again = roll(grid)
    assert again.status == "completed"  # type: ignore[attr-defined]
    version = again.model_version  # type: ignore[attr-defined]
    assert [active(s) for s in fleet.states] == [version] * 3
    with DeviceState.open(fleet.states[one]) as d:
        assert d.models()[0].parent == first
    # a rollback re-activates the parent model the device still holds
    back = RecordDict({"rollout": ConfigRecord({"phase": "rollback", "rollout-id": "x", "version": version})})
    (reply,) = grid.send_and_receive([Message(back, NODE + one, QUERY_ROLLOUT)])
    assert reply.content["rollout-result"]["rolled-back"] and active(fleet.states[one]) == first


def test_tampered_bundle_is_refused_by_the_first_wave(shipped: tuple[Fleet, Path, Path], fleet: Fleet,
                                                      tmp_path: Path) -> None:
    bundle = shipped[1]
    blob = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        info = tar.getmember("model.int8.onnx")
    blob[info.offset_data + info.size // 2] ^= 0xFF  # one byte of the ONNX inside the archive
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(blob))
    summary = roll(grid_for(fleet, bad))
    assert summary.status == "rolled-back" and summary.waves[0]["passed"] == []  # type: ignore[attr-defined]
    first = fleet.device_ids[order(fleet)[0]]
    with RolloutStore(fleet.run / "rollout.sqlite") as store:
        reasons = store.devices(summary.rollout_id)[first]["reasons"]  # type: ignore[attr-defined]
    assert "bundle refused (hash-mismatch): sha256 mismatch for model.int8.onnx" in reasons[0]
    assert [active(s) for s in fleet.states] == ["", "", ""]
    assert not any(p.name.startswith(".rollout-") for s in fleet.states for p in s.iterdir())  # nothing left over


def test_devices_that_filed_requests_check_their_forgotten_samples(shipped: tuple[Fleet, Path, Path],
                                                                   fleet: Fleet, tmp_path: Path) -> None:
    bundle = shipped[1]
    strict = copy_fleet(fleet, tmp_path / "strict")  # before anything changes
    summary = roll(grid_for(fleet, bundle, waves="100"))
    assert summary.status == "completed"  # type: ignore[attr-defined]
    with RolloutStore(fleet.run / "rollout.sqlite") as store:
        results = store.devices(summary.rollout_id)  # type: ignore[attr-defined]
    for i, device in enumerate(fleet.device_ids):
        assert results[device]["result"]["forget-samples"] == FILED
        assert results[device]["result"]["forget-held-out"] == len(fleet.held_out[i])
        assert 0.0 <= results[device]["result"]["forget-auc"] <= 0.75
    # the summary names the bundle's evidence level and each device's forget check with the same level names
    assert summary.evidence_level == read_manifest(bundle)["evidence_level"] == "approximate-verified"  # type: ignore[attr-defined]
    checks = summary.waves[0]["forget_checks"]  # type: ignore[attr-defined]
    assert sorted(checks) == sorted(fleet.device_ids)
    for c in checks.values():
        assert c["samples"] == FILED and c["level"] == forget_check_level(c["auc"], FILED, c["held_out"], 0.75)
        assert c["level"] in ("approximate-verified", "approximate-inconclusive")
    written = json.loads(next((fleet.run / "rollouts").glob(f"{summary.rollout_id}-*.json")).read_text())  # type: ignore[attr-defined]
    assert written["evidence_level"] == "approximate-verified"
    assert written["waves"][0]["forget_checks"][fleet.device_ids[0]]["level"]

    # The same devices and bundle with an impossible AUC limit: every device fails its forget check.
    grid = grid_for(strict, bundle, waves="100")
    for ctx in grid.contexts.values():
        ctx.run_config["max-forget-auc"] = 1e-6
    failed = roll(grid)
    assert failed.status == "rolled-back"  # type: ignore[attr-defined]
    with RolloutStore(strict.run / "rollout.sqlite") as store:
        reasons = store.devices(failed.rollout_id)[strict.device_ids[0]]["reasons"]  # type: ignore[attr-defined]
    assert "own forgotten samples still look like members: loss-attack AUC" in reasons[0]
    assert [active(s) for s in strict.states] == ["", "", ""]


def test_on_board_forget_check_levels_follow_the_validation_rule() -> None:
    assert forget_check_level(0.55, 500, 500, 0.75) == "approximate-verified"  # noise ~0.03 < margin 0.25
    assert forget_check_level(0.9, 500, 500, 0.75) == "failed"
    assert forget_check_level(0.55, 3, 4, 0.75) == "approximate-inconclusive"  # noise ~0.37 > margin 0.25
    assert forget_check_level(0.55, 3, 4, 0.5) == "failed"  # a limit at the ideal is always judged


def test_rollout_cli_checks_its_inputs_before_starting_anything(shipped: tuple[Fleet, Path, Path],
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run, bundle = shipped[0].run, shipped[1]
    assert main(["rollout", "--run", str(run), "--bundle", str(tmp_path / "none.tar")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--waves", "50,25"]) == 2
    assert "must increase strictly" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--app", str(tmp_path)]) == 2
    assert "has no pyproject.toml" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--flwr", str(tmp_path / "no-flwr")]) == 2
    assert "Flower CLI" in capsys.readouterr().err


def test_status_summarises_the_run(shipped: tuple[Fleet, Path, Path], fleet: Fleet, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle, run, key = shipped[1], fleet.run, fleet.keys / "public_key.hex"
    roll(grid_for(fleet, bundle, waves="100"))
    assert main(["status", "--run", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ledger"]["requests"] == 6 and status["validation"]["passed"] is True
    assert status["rollouts"][0]["status"] == "completed" and status["rollouts"][0]["devices"] == {"installed": 3}
    assert {m["method"] for m in status["models"]["results"]} >= {"qmul", "finetune"}
    assert main(["status", "--run", str(run)]) == 0
    assert "rollout" in capsys.readouterr().out
    # the next bundle names the model now on the fleet as its parent
    from edge_qmul.devices.profiles import load_profile
    from edge_qmul.export.bundle import build_bundle

    keys = key.parent
    nxt = tmp_path / "next.tar"
    assert main(["bundle", "--run", str(run), "--device", "x86-server", "--key", str(keys / "signing_key.pem"),
                 "--out", str(nxt)]) == 0
    assert read_manifest(nxt)["parent_version"] == status["rollouts"][0]["model_version"]
    # the export layer cannot see the fleet: called directly, the parent is whatever the caller says
    assert read_manifest(build_bundle(run, load_profile("x86-server"), keys / "signing_key.pem",
                                      out=tmp_path / "orphan.tar"))["parent_version"] is None
    assert main(["status", "--run", str(tmp_path / "nope")]) == 4
