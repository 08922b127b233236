"""Staged rollout through the in-process Grid (the real ServerApp / ClientApp code and Flower serialization).

The same flow through a real SuperLink and SuperNodes is in test_federated_deploy.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import copy_run
from edge_qmul.export.bundle import read_manifest
from edge_qmul.federated import client_app
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import run_rollout_round, run_round
from edge_qmul.federated.rollout import RolloutStore, forget_check_level, parse_waves, wave_partitions
from fleet import faults as fleet_faults
from fleet.inprocess import NODE, LocalGrid, local_grid
from flwr.app import Message

from edge_qmul.cli import main
from edge_qmul.errors import ConfigError

pytestmark = pytest.mark.usefixtures("flower_process")

LOOSE = "[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n"


@pytest.fixture(scope="module")
def shipped(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A run with two signed bundles (qmul, then finetune as the 'fixed' model) and the fleet key."""
    tmp = tmp_path_factory.mktemp("rollout")
    run = copy_run(demo_run, tmp)
    (tmp / "loose.toml").write_text(LOOSE)
    assert main(["keygen", "--out", str(tmp / "keys")]) == 0
    bundles = []
    for method in ("qmul", "finetune"):
        assert main(["export", "--run", str(run), "--method", method]) == 0
        assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(tmp / "loose.toml"),
                     "--method", method]) == 0
        out = tmp / f"{method}.tar"
        assert main(["bundle", "--run", str(run), "--device", "x86-server", "--key",
                     str(tmp / "keys" / "signing_key.pem"), "--out", str(out)]) == 0
        bundles.append(out)
    return run, bundles[0], bundles[1], tmp / "keys" / "public_key.hex"


def grid_for(run: Path, state: Path, bundle: Path, key: Path, waves: str = "33,100",
             faults: dict[int, str] | None = None, drop: object = None) -> LocalGrid:
    """``faults``: partition -> fault of tests/fleet/faults.py (the devices then run its ClientApp)."""
    grid = local_grid(run, state, {"mode": "rollout", "bundle": str(bundle), "waves": waves},
                      node_config={"fleet-key": str(key)}, drop=drop or (lambda m: False),  # type: ignore[arg-type]
                      app=fleet_faults.app if faults else client_app.app)
    for pid, fault in (faults or {}).items():
        grid.contexts[NODE + pid].node_config[fleet_faults.FAULTS_KEY] = fault
    return grid


def roll(grid: LocalGrid) -> object:
    return run_rollout_round(grid, FederatedConfig.from_run_config(grid.contexts[NODE].run_config))


def active(state: Path, pid: int) -> str | None:
    path = state / f"device{pid}" / "device.json"
    return json.loads(path.read_text()).get("model", {}).get("active") if path.exists() else None


def test_waves_are_cumulative_and_validated() -> None:
    assert wave_partitions([5, 25, 100], 5) == [[0], [0, 1], [0, 1, 2, 3, 4]]  # at least one device per wave
    assert wave_partitions([33, 100], 3) == [[0], [0, 1, 2]]
    assert wave_partitions([50, 100], 3) == [[0, 1], [0, 1, 2]]
    for bad in ("5,25", "25,5,100", "0,100", "a,100"):
        with pytest.raises(ConfigError):
            parse_waves(bad)


def test_rollout_reaches_every_device_and_resumes_after_a_crash(shipped: tuple[Path, Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    run, bundle, _, key = shipped
    run = copy_run(run, tmp_path)
    version = read_manifest(bundle)["model_version"]
    installs: list[int] = []
    crash = {"armed": True}

    def crash_in_wave_two(message: Message) -> bool:
        content = message.content.get("rollout")
        if content is not None and content["phase"] == "install":
            pid = message.metadata.dst_node_id - NODE
            if pid != 0 and crash["armed"]:
                crash["armed"] = False
                raise RuntimeError("server crashed")  # the ServerApp dies mid-wave
            installs.append(pid)
        return False

    grid = grid_for(run, tmp_path / "state", bundle, key, waves="33,100", drop=crash_in_wave_two)
    with pytest.raises(RuntimeError, match="server crashed"):
        roll(grid)
    with RolloutStore(run / "rollout.sqlite") as store:
        (state,) = store.all()
        assert (state.status, state.next_wave) == ("running", 1)  # wave 1 recorded as passed
    summary = roll(grid)  # the restarted server resumes at wave 2
    assert summary.status == "completed"  # type: ignore[attr-defined]
    assert installs == [0, 1, 2]  # device 0 (wave 1) was not sent the bundle again
    assert [active(tmp_path / "state", p) for p in range(3)] == [version] * 3
    with RolloutStore(run / "rollout.sqlite") as store:
        assert {p: d["status"] for p, d in store.devices(state.rollout_id).items()} == dict.fromkeys(range(3),
                                                                                                      "installed")
    assert roll(grid).status == "completed"  # type: ignore[attr-defined]  # a finished rollout is final


def test_failed_wave_rolls_back_then_a_fixed_model_reaches_everyone(shipped: tuple[Path, Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    run, bad_run_bundle, fixed, key = shipped
    run = copy_run(run, tmp_path)
    state = tmp_path / "state"
    # device 2's runtime is broken: wave 2 (devices 1 and 2) fails and device 1 goes back to the parent
    grid = grid_for(run, state, bad_run_bundle, key, waves="33,100", faults={2: "broken-runtime"})
    summary = roll(grid)
    assert summary.status == "rolled-back"  # type: ignore[attr-defined]
    wave = summary.waves[-1]  # type: ignore[attr-defined]
    assert (wave["devices"], wave["passed"], wave["rolled_back"]) == ([1, 2], [1], [1])
    first = summary.model_version  # type: ignore[attr-defined]
    assert [active(state, p) for p in range(3)] == [first, None, None]
    with RolloutStore(run / "rollout.sqlite") as store:
        devices = store.devices(summary.rollout_id)  # type: ignore[attr-defined]
    assert devices[1]["status"] == "rolled-back" and devices[2]["status"] == "failed"
    assert "simulated broken runtime" in devices[2]["reasons"][0]

    # the board is repaired; a fixed model rolls out to every client
    grid = grid_for(run, state, fixed, key, waves="33,66,100")
    again = roll(grid)
    assert again.status == "completed"  # type: ignore[attr-defined]
    assert [active(state, p) for p in range(3)] == [again.model_version] * 3  # type: ignore[attr-defined]


def test_tampered_bundle_is_refused_by_the_first_wave(shipped: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    run, bundle, _, key = shipped
    run = copy_run(run, tmp_path)
    blob = bytearray(bundle.read_bytes())
    with tarfile.open(bundle) as tar:
        info = tar.getmember("model.int8.onnx")
    blob[info.offset_data + info.size // 2] ^= 0xFF  # one byte of the ONNX inside the archive
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(blob))
    summary = roll(grid_for(run, tmp_path / "state", bad, key))
    assert summary.status == "rolled-back" and summary.waves[0]["passed"] == []  # type: ignore[attr-defined]
    with RolloutStore(run / "rollout.sqlite") as store:
        reasons = store.devices(summary.rollout_id)[0]["reasons"]  # type: ignore[attr-defined]
    assert "bundle refused (hash-mismatch): sha256 mismatch for model.int8.onnx" in reasons[0]
    assert active(tmp_path / "state", 0) is None


def test_devices_that_filed_requests_check_their_forgotten_samples(shipped: tuple[Path, Path, Path, Path],
                                                                   tmp_path: Path) -> None:
    run, bundle, _, key = shipped
    run = copy_run(run, tmp_path)
    state = tmp_path / "state"
    intake = local_grid(run, state, {"mode": "intake", "samples-per-request": 10})
    assert run_round(intake, FederatedConfig.from_run_config(intake.contexts[NODE].run_config)).accepted == 6
    summary = roll(grid_for(run, state, bundle, key, waves="100"))
    assert summary.status == "completed"  # type: ignore[attr-defined]
    with RolloutStore(run / "rollout.sqlite") as store:
        results = store.devices(summary.rollout_id)  # type: ignore[attr-defined]
    for pid in range(3):
        assert results[pid]["result"]["forget-samples"] == 20
        assert 0.0 <= results[pid]["result"]["forget-auc"] <= 0.75
    # the summary names the bundle's evidence level and each device's forget check with the same level names
    assert summary.evidence_level == read_manifest(bundle)["evidence_level"] == "approximate-verified"  # type: ignore[attr-defined]
    checks = summary.waves[0]["forget_checks"]  # type: ignore[attr-defined]
    assert sorted(checks) == [0, 1, 2]
    for c in checks.values():
        assert c["samples"] == 20 and c["level"] == forget_check_level(c["auc"], 20, c["held_out"], 0.75)
        assert c["level"] in ("approximate-verified", "approximate-inconclusive")
    written = json.loads(next((run / "rollouts").glob(f"{summary.rollout_id}-*.json")).read_text())  # type: ignore[attr-defined]
    assert written["evidence_level"] == "approximate-verified" and written["waves"][0]["forget_checks"]["0"]["level"]

    # The same devices and bundle with an impossible AUC limit: every device fails its forget check.
    strict_run = copy_run(shipped[0], tmp_path / "strict")
    strict_state = tmp_path / "strict-state"
    shutil.copytree(state, strict_state)
    grid = grid_for(strict_run, strict_state, bundle, key, waves="100")
    for ctx in grid.contexts.values():
        ctx.run_config["max-forget-auc"] = 1e-6
    failed = roll(grid)
    assert failed.status == "rolled-back"  # type: ignore[attr-defined]
    with RolloutStore(strict_run / "rollout.sqlite") as store:
        reasons = store.devices(failed.rollout_id)[0]["reasons"]  # type: ignore[attr-defined]
    assert "own forgotten samples still look like members: loss-attack AUC" in reasons[0]


def test_on_board_forget_check_levels_follow_the_validation_rule() -> None:
    assert forget_check_level(0.55, 500, 500, 0.75) == "approximate-verified"  # noise ~0.03 < margin 0.25
    assert forget_check_level(0.9, 500, 500, 0.75) == "failed"
    assert forget_check_level(0.55, 3, 4, 0.75) == "approximate-inconclusive"  # noise ~0.37 > margin 0.25
    assert forget_check_level(0.55, 3, 4, 0.5) == "failed"  # a limit at the ideal is always judged


def test_rollout_cli_checks_its_inputs_before_starting_anything(shipped: tuple[Path, Path, Path, Path],
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run, bundle, _, _ = shipped
    assert main(["rollout", "--run", str(run), "--bundle", str(tmp_path / "none.tar")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--waves", "50,25"]) == 2
    assert "must increase strictly" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--app", str(tmp_path)]) == 2
    assert "has no pyproject.toml" in capsys.readouterr().err
    assert main(["rollout", "--run", str(run), "--bundle", str(bundle), "--flwr", str(tmp_path / "no-flwr")]) == 2
    assert "Flower CLI" in capsys.readouterr().err


def test_status_summarises_the_run(shipped: tuple[Path, Path, Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, bundle, _, key = shipped
    run = copy_run(run, tmp_path)
    roll(grid_for(run, tmp_path / "state", bundle, key, waves="100"))
    assert main(["status", "--run", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ledger"]["requests"] == 1 and status["validation"]["passed"] is True
    assert status["rollouts"][0]["status"] == "completed" and status["rollouts"][0]["devices"] == {"installed": 3}
    assert {m["method"] for m in status["models"]["results"]} >= {"qmul", "finetune", "retrain"}
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
