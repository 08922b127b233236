"""A real Flower deployment on loopback: one ``flower-superlink`` and N ``flower-supernode`` processes.

Used by the deployment tests (tests/test_federated_deploy.py) and the intake load check
(bench/intake_load.py). Every process runs in its own session with its own FLWR_HOME under ``root``,
listens on 127.0.0.1 only, and is stopped by its process-group id (helpers a process spawns, such as
flwr-serverapp and flwr-clientapp, share its group). The app is started with `flwr run <repo> lb` and its
status polled with `flwr list` (ARCHITECTURE.md §8: `flwr run` can exit 0 on a failed run).

Transport as in the README's fleet recipe: ``edge_qmul.federated.certs`` makes a CA and the SuperLink's
certificate (SAN 127.0.0.1); the SuperLink serves TLS (``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``)
with SuperNode authentication (``--enable-supernode-auth``); each SuperNode has its own EC key pair, whose
public key is registered with ``flwr supernode register`` before the node starts, and trusts the CA
(``--root-certificates``); the `flwr` CLI connection names the CA (``root-certificates``). No ``--insecure``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_qmul.federated.certs import FleetCerts, NodeKey, make_certs, make_node_key
from edge_qmul.federated.flwr_cli import FlwrCli

from fleet import isolation

# The app `flwr run` bundles: this checkout's pyproject (an editable install; tests and benches run there).
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 480.0  # seconds for one `flwr run` (60–130 s seen on 2 cores; generous for a loaded machine)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def _reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait for a process sent SIGTERM (SIGKILL it after ``timeout`` s), then SIGKILL what is left of its process
    group: the helpers it spawned (flwr-serverapp / flwr-clientapp) share it (started with start_new_session)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)

class Deployment:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1, plus the `flwr` CLI pointed at them."""

    def __init__(self, root: Path, nodes: int = 3, node_extra: dict[int, str] | None = None,
                 states: list[Path] | None = None, hide: dict[int, list[Path]] | None = None) -> None:
        self.root = root
        # device index -> paths its SuperNode must not see: it runs in its own mount namespace with them hidden
        # (fleet/isolation.py; needs root)
        self.hide = dict(hide or {})
        self.nodes = nodes
        self.node_extra = dict(node_extra or {})  # device index -> extra node-config entries
        self.states = list(states or [])  # device index -> its DeviceState dir (edge-qmul device init)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[int, int] = {}  # device index -> Flower node id of its registered key
        self._logs: list[Any] = []
        (root / "tmp").mkdir(parents=True)
        self.certs: FleetCerts = make_certs(root / "certs", hosts=("127.0.0.1",), days=1)
        cli_home = root / "home-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "lb"\n\n[superlink.lb]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs.ca_cert}"\n'
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
        c = self.certs
        self._spawn("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
            "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth", "--host", "127.0.0.1",
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        ])
        tls = ssl.create_default_context(cafile=str(c.ca_cert))  # verifies the certificate and its 127.0.0.1 SAN
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/health", timeout=2, context=tls) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline or self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"SuperLink did not become healthy:\n{self.tail('superlink')}")
            time.sleep(0.3)
        for i in range(self.nodes):  # every key first: a node started in its own namespace then hides the others'
            self.node_key(f"node{i}")
        for i in range(self.nodes):
            self.start_node(i, self.node_extra.get(i, ""))

    def node_key(self, name: str) -> NodeKey:
        """The SuperNode authentication key pair ``keys/NAME`` (made on first use)."""
        private = self.root / "keys" / name
        if private.exists():
            return NodeKey(private, private.with_name(name + ".pub"))
        return make_node_key(private)

    def register(self, key: NodeKey) -> int:
        """`flwr supernode register KEY.pub lb`: the SuperLink admits a SuperNode holding this key; its node id."""
        res = self.cli("supernode", "register", str(key.public), "lb", "--format", "json")
        if res.returncode != 0 or "{" not in res.stdout:
            raise RuntimeError(f"flwr supernode register failed:\n{res.stdout}\n{res.stderr}")
        return int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])

    def registered_nodes(self) -> dict[int, str]:
        """`flwr supernode list lb`: node id -> status (registered, online, offline, ...)."""
        res = self.cli("supernode", "list", "lb", "--format", "json")
        if res.returncode != 0 or "{" not in res.stdout:
            raise RuntimeError(f"flwr supernode list failed:\n{res.stdout}\n{res.stderr}")
        return {int(n["node-id"]): n["status"] for n in json.loads(res.stdout[res.stdout.index("{"):])["nodes"]}

    def start_node(self, i: int, extra: str = "", name: str | None = None, register: bool = True,
                   root_certificates: Path | None = None) -> None:
        """Start SuperNode ``i`` (the device whose state is ``states[i]``) over TLS with its own key
        (``keys/node<i>``, registered first unless ``register`` is False); its node config is that state dir,
        and ``extra`` adds entries, e.g. a fault of fleet/faults.py: 'faults="requests"'.
        ``name`` (default ``node<i>``) names the process, its key, its FLWR_HOME and its log;
        ``root_certificates`` replaces the fleet CA the node trusts."""
        name = name or f"node{i}"
        key = self.node_key(name)
        if register and i not in self.node_ids:
            self.node_ids[i] = self.register(key)
        config = f'state-dir="{self.state_dir(i, name)}" {extra}'.strip()
        command = [
            str(BIN / "flower-supernode"), "--root-certificates", str(root_certificates or self.certs.ca_cert),
            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(key.private),
            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config,
        ]
        if i in self.hide:  # the CA's private key and the other nodes' keys are never a device's to see
            others = [k for k in (self.root / "keys").glob("*") if k not in (key.private, key.public)]
            command = isolation.hidden(command, [*self.hide[i], self.certs.ca_key, *others])
        self._spawn(name, command)

    def state_dir(self, i: int, name: str | None = None) -> Path:
        """Device ``i``'s state dir (``states[i]``); another process ``name`` gets a dir of its own under root."""
        if name in (None, f"node{i}") and i < len(self.states):
            return self.states[i]
        return self.root / (f"device{i}" if name in (None, f"node{i}") else f"device-{name}")

    def statuses(self, i: int) -> dict[str, str]:
        """Device ``i``'s requests: request id -> status (pending, sent, acknowledged, refused, honoured)."""
        from edge_qmul.devices.state import DeviceState

        with DeviceState.open(self.state_dir(i)) as d:
            return {r.request_id: r.status for r in d.requests()}

    @property
    def cli(self) -> FlwrCli:
        """The `flwr` CLI pointed at this deployment (connection "lb")."""
        return FlwrCli("lb", str(BIN / "flwr"), self.env("home-cli"), self.root / "tmp")

    def run_app(self, run_config: str, app: Path = REPO) -> int:
        """`flwr run` the app (default: the repository's pyproject) on this deployment; returns the run id."""
        return self.cli.run_app(app, run_config)

    def fault_app(self, serverapp: str = "") -> Path:
        """A Flower app whose ClientApp is ``fleet.faults:app`` (the production one plus the ``faults``
        node-config key), for runs where devices misbehave on purpose. Its bundle carries tests/fleet, so the
        SuperNodes import the fault module from the FAB; the ServerApp (unless ``serverapp`` names one in
        tests/fleet, e.g. ``fleet.probe:app``) and all else is the installed package."""
        app = self.root / ("fault-app" + (f"-{serverapp.split(':')[0].rsplit('.', 1)[-1]}" if serverapp else ""))
        if app.exists():
            return app
        (app / "fleet").mkdir(parents=True)
        for name in ("__init__.py", "faults.py", "probe.py"):
            shutil.copy2(HERE / name, app / "fleet" / name)
        text = (REPO / "pyproject.toml").read_text()
        swaps = [('clientapp = "edge_qmul.federated.client_app:app"', 'clientapp = "fleet.faults:app"'),
                 ('fab-include = ["federated/**/*.py", "/README.md"]', 'fab-include = ["fleet/*.py"]')]
        if serverapp:
            swaps.append(('serverapp = "edge_qmul.federated.server_app:app"', f'serverapp = "{serverapp}"'))
        for old, new in swaps:
            if old not in text:
                raise RuntimeError(f"pyproject.toml no longer has {old!r}: update Deployment.fault_app")
            text = text.replace(old, new)
        (app / "pyproject.toml").write_text(text)
        return app

    def wait(self, run_id: int, timeout: float = RUN_TIMEOUT) -> str:
        return self.cli.wait(run_id, timeout)

    def server_log(self, run_id: int) -> str:
        return self.cli.log(run_id)

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.root / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str) -> None:
        """SIGKILL one process by its pid (a SuperNode's ClientApp children exit when their parent dies)."""
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def started(self, pid: int) -> bool:
        """Whether ``pid`` is one of our processes or a descendant of one (e.g. the ServerApp the SuperLink
        spawned): walks the parent chain in /proc."""
        ours = {p.pid for p in self.procs.values()}
        while pid > 1:
            if pid in ours:
                return True
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            pid = int(stat[stat.rindex(")") + 2 :].split()[1])  # field 4: ppid (after the comm in parens)
        return False

    def restart_node(self, i: int, extra: str = "") -> None:
        """Stop SuperNode ``i`` and its ClientApp helpers (its process group), then start it with ``extra``.

        SIGTERM first: a SuperNode that exits cleanly deactivates itself on the SuperLink. With node
        authentication, a SIGKILLed one stays "online" there until its heartbeat expires, and the same key
        cannot activate again before that (the new process exits with Flower's code 305)."""
        proc = self.procs[f"node{i}"]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        _reap(proc, 20)
        self.node_extra[i] = extra
        self.start_node(i, extra)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # pgid == pid: started with start_new_session
        for proc in self.procs.values():
            _reap(proc, 10)
        for log in self._logs:
            log.close()
