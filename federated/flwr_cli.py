"""Driving a Flower deployment through the `flwr` CLI: start the app, poll its status, read its log.

``flwr run`` can exit 0 for a run that later fails (ARCHITECTURE.md §8), so ``wait`` polls ``flwr list`` until
the run reaches a ``finished:*`` status. Used by ``edge-qmul rollout`` and the loopback deployment.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_qmul.errors import ConfigError


@dataclass
class FlwrCli:
    connection: str  # a [superlink.<name>] entry of $FLWR_HOME/config.toml
    executable: str = "flwr"
    env: Mapping[str, str] | None = None
    cwd: Path | None = None

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self.executable, *args], cwd=self.cwd, env=self.env, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except FileNotFoundError as err:
            raise ConfigError(f"the Flower CLI {self.executable!r} is not installed or not on PATH",
                              "install edge-qmul with its dependencies (flwr) or pass --flwr PATH") from err

    def run_app(self, app: Path, run_config: str) -> int:
        """`flwr run APP CONNECTION -c RUN_CONFIG`; returns the run id."""
        res = self("run", str(app), self.connection, "--format", "json", "-c", run_config, timeout=300)
        if res.returncode != 0 or "{" not in res.stdout:
            raise RuntimeError(f"flwr run failed:\n{res.stdout}\n{res.stderr}")
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        if not payload.get("success"):
            raise RuntimeError(f"flwr run failed: {payload}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> str:
        res = self("list", self.connection, "--run-id", str(run_id), "--format", "json")
        if res.returncode != 0 or "{" not in res.stdout:
            return "unknown"
        runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
        return str(runs[0]["status"]) if runs else "unknown"

    def wait(self, run_id: int, timeout: float, poll: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(poll)
        return "timeout"

    def log(self, run_id: int) -> str:
        res = self("log", str(run_id), self.connection, "--show", timeout=30)
        return res.stdout + res.stderr
