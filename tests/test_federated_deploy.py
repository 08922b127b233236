"""The real deployment: flower-superlink + three flower-supernode processes on loopback, the app started with
`flwr run <repo> lb`, the run polled with `flwr list` (DESIGN §8: `flwr run` can exit 0 on a failed run).

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
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edge_qmul.federated import protocol
from edge_qmul.federated.store import FleetStore
from edge_qmul.federated.task import EXPECTED_FAULT_REASONS

from edge_qmul import pipeline
from edge_qmul.config import DataConfig, QuantConfig
from edge_qmul.ledger import Ledger
from edge_qmul.train import TrainConfig

pytestmark = pytest.mark.federated

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODES = 3
RUN_TIMEOUT = 480.0  # seconds for one `flwr run` (60–130 s seen on 2 cores; generous for a loaded machine)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deployment:
    """A SuperLink and ``NODES`` SuperNodes on 127.0.0.1, plus the `flwr` CLI pointed at them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []
        (root / "tmp").mkdir(parents=True)
        cli_home = root / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "lb"\n\n[superlink.lb]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def env(self, home: str) -> dict[str, str]:
        path = self.root / home
        path.mkdir(exist_ok=True)
        return {
            **os.environ,
            "FLWR_HOME": str(path),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink spawns helpers by name
            "TMPDIR": str(self.root / "tmp"),
        }

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115  (closed in stop(), after the process)
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            args, cwd=self.root / "tmp", env=self.env(f"home-{name}"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> None:
        self._spawn("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline or self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink did not become healthy:\n{self.tail('superlink')}")
            time.sleep(0.3)
        for i in range(NODES):
            state_dir = self.state_dir(i)
            self._spawn(f"node{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f'partition-id={i} num-partitions={NODES} state-dir="{state_dir}"',
            ])

    def state_dir(self, i: int) -> Path:
        return self.root / f"device{i}"

    def device_state(self, i: int) -> dict[str, Any]:
        path = self.state_dir(i) / "device.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.root / "tmp", env=self.env("home-cli"),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def run_app(self, run_config: str) -> int:
        res = self.flwr("run", str(REPO), "lb", "--format", "json", "-c", run_config)
        assert res.returncode == 0, f"flwr run failed:\n{res.stdout}\n{res.stderr}"
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        assert payload["success"], payload
        return int(payload["run-id"])

    def status(self, run_id: int) -> str:
        res = self.flwr("list", "lb", "--run-id", str(run_id), "--format", "json")
        if res.returncode != 0:
            return "unknown"
        runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def wait(self, run_id: int, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        return "timeout"

    def server_log(self, run_id: int) -> str:
        res = self.flwr("log", str(run_id), "lb", "--show", timeout=30)
        return res.stdout + res.stderr

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one process by its pid (a SuperNode's ClientApp children exit when their parent dies)."""
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # pgid == pid: started with start_new_session
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # Helpers the process spawned (flwr-serverapp / flwr-clientapp) share its process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run directory with a float model and its int8 / QAT copies (no requests yet)."""
    run = tmp_path_factory.mktemp("federated") / "trained"
    pipeline.train(run, DataConfig(dataset="digits"), TrainConfig(epochs=3), quiet=True)
    pipeline.quantize(run, QuantConfig(), quiet=True)
    return run


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(tmp_path / "deploy")
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()


def _report(dep: Deployment, run_id: int, status: str) -> str:
    return f"run {run_id}: {status}\n--- server log ---\n{dep.server_log(run_id)}\n--- superlink ---\n" + dep.tail(
        "superlink"
    )


def test_deployment_records_genuine_requests_and_refuses_the_rest(
    deployment: Deployment, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    key_file = tmp_path / "keys.json"  # device 2 is pre-registered with a key it does not hold
    key_file.write_text(json.dumps({"2": protocol.public_key_bytes(protocol.generate_key()).hex()}))
    t0 = time.monotonic()
    run_id = deployment.run_app(
        f'run-dir="{run}" key-file="{key_file}" inject-faults=true class-partitions="0" leave-partitions="1"'
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
    result = run / "unlearn" / "qmul" / "result.pt"
    assert result.is_file() and version == f"qmul-{pipeline.sha256_file(result)[:12]}"
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
