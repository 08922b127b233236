"""The production ServerApp and ClientApp under Flower's simulation engine with 20 virtual devices (issue 15, item 9):
each device its own state dir from its own .npz, requests filed on the devices, intake, central unlearning with
receipts and a 3-wave rollout; nothing lost or duplicated, and every device ends on the new model.

bench/fleet_scale.py runs the same harness (tests/fleet/simulation.py) on 10 to 1,000 devices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edge_qmul.export.bundle import read_manifest
from fleet.simulation import build_fleet, fleet_copy, run_protocol, simulation_runner

pytestmark = pytest.mark.federated

DEVICES = 20
PER_DEVICE = 3


def test_twenty_virtual_devices_file_get_receipts_and_take_a_three_wave_rollout(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("EDGE_QMUL_QUIET", "1")
    fleet = build_fleet(tmp_path / "template", DEVICES, epochs=1)
    copy = fleet_copy(fleet, tmp_path / "fleet", DEVICES)
    out = run_protocol(copy, simulation_runner(copy), PER_DEVICE, reply_timeout=600.0, log=lambda m: None)

    filed = DEVICES * PER_DEVICE
    intake = out["intake"]["summary"]
    assert (intake["nodes"], intake["replied"], intake["accepted"], intake["refused"]) == (DEVICES, DEVICES, filed, 0)
    # after intake: every request in the ledger once, and acknowledged on its device
    first = out["audit_after_intake"]
    assert first["statuses"] == {"acknowledged": filed} and first["lost"] == first["duplicated"] == 0
    # central: nothing new to file, Q-MUL honours all of them, and every device gets its receipts
    central = out["central"]["summary"]
    assert (central["accepted"], central["already_recorded"], central["honoured"], central["receipts"]) == \
        (0, 0, filed, DEVICES)
    # the rollout: 3 cumulative waves (5% -> 25% -> 100% of 20 = 1, 5, 20 devices), all passed
    rollout = out["rollout"]
    assert rollout["status"] == "completed"
    assert [(w["percent"], w["devices"], w["passed"]) for w in rollout["waves"]] == \
        [(5, 1, 1), (25, 4, 4), (100, 15, 15)]
    assert sum(rollout["forget_check_levels"].values()) == DEVICES  # each device ran its own forget check
    # the final accounting, from the ledger and every device's own state
    final = out["audit"]
    assert final["filed"] == final["ledger_rows"] == final["distinct_ids"] == final["acknowledged"] == filed
    assert final["lost"] == 0 and final["duplicated"] == 0 and final["refused"] == 0
    assert final["statuses"] == {"honoured": filed}
    version = read_manifest(copy.root / "qmul.bundle.tar")["model_version"]
    assert final["models"] == {version: DEVICES} and out["on_new_model"] == DEVICES
    for pid in range(DEVICES):
        with copy.device(pid) as device:
            assert device.model_dir() is not None and device.model_dir().name == version  # installed in its state
