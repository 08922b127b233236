"""A fleet of many devices under Flower's simulation engine: the production ServerApp and ClientApp, N virtual
SuperNodes, each device with its own state directory (issue 15, item 9; DESIGN.md §8 "Scale").

The pieces, in the order a benchmark or test uses them:

- ``build_fleet(root, devices)``: the fleet's data and the server's run. Each device gets its own small
  ``.npz`` (``x_train``: the samples it contributes; ``x_test``: samples it keeps, the non-members of its
  on-board forget check) cut from Fashion-MNIST, a device state made by ``DeviceState.init`` from that file
  (its own Ed25519 key = its device id, the fleet's pinned key), and the server trains and quantizes a small
  CNN on the union of the contributed samples with a provenance CSV mapping each device's trained hashes to
  its device id. Made once per size and reused as a template (``fleet_copy``).
- ``fleet_copy(fleet, dst, n)``: a fresh copy of the run (empty ledger) and of the first ``n`` devices'
  states under ``dst/states/device-<partition id>``, the layout the ClientApp reads in simulation
  (run config ``state-root``: Flower's simulated nodes only carry ``partition-id`` / ``num-partitions``).
- ``file_requests(copy, per_device)``: each device files ``per_device`` requests with ``DeviceState.forget``,
  each naming one of its own trained samples (its user asking, not the run config).
- ``simulate(copy, run_config)``: one ``flwr run``-equivalent in process: the ServerApp in a thread, the
  ClientApp on Ray actors (``flwr.simulation``); returns the wall time and the server's peak RSS.
- ``audit(copy)``: lost and duplicated requests, counted from the forget ledger against the devices' own
  queues.

The ServerApp thread runs in this process, so this process's RSS (``ru_maxrss``) is the server side (the
SuperLink's in-memory link state plus the ServerApp); the devices run in Ray worker processes.

This module does not ship (tests/ is not a package of the distribution). It needs ``flwr[simulation]``
(Ray), which the ``dev`` extra installs.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edge_qmul.devices.state import DataSpec, DeviceState

FASHION = Path("/usr/share/datasets/fashion-mnist")
STATES = "states"  # <copy>/states/device-<partition id>: the run config's state-root
SERVER_TEST = 1000  # Fashion-MNIST test images the server keeps as its own test split


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def fashion_pool(root: Path = FASHION) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images (the package's IDX reader) as uint8 (N, 1, 28, 28) and int64 labels, exact
    duplicates dropped (a content id names one image, and two devices holding the same bytes would own both)."""
    from edge_qmul import data

    source = data.load_dataset("fashion-mnist", root)
    assert source.test is not None
    images = np.concatenate([source.train.images, source.test.images])
    labels = np.concatenate([source.train.labels, source.test.labels]).astype(np.int64)
    seen: set[bytes] = set()
    keep = []
    for i, image in enumerate(images):
        digest = hashlib.sha256(image.tobytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return images[keep].copy(), labels[keep]


def classes_of(labels: np.ndarray) -> list[int]:
    return sorted(int(k) for k in np.unique(labels))


# --------------------------------------------------------------------------------------------------
# The fleet template: device data, device states, the server's run
# --------------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    root: Path
    run: Path  # trained + quantized, with provenance; its ledger is empty
    states: Path  # template device states: states/device-<pid>
    signing_key: Path  # the fleet's bundle signing key (its public key is pinned on every device)
    device_ids: list[str]  # by partition id
    trained: list[list[str]]  # per partition id: content ids of its samples the server trained on
    seconds: dict[str, float] = field(default_factory=dict)

    def save(self) -> None:
        (self.root / "fleet.json").write_text(json.dumps({
            "run": str(self.run), "states": str(self.states), "signing_key": str(self.signing_key),
            "device_ids": self.device_ids, "trained": self.trained, "seconds": self.seconds}))

    @classmethod
    def load(cls, root: Path) -> Fleet:
        d = json.loads((root / "fleet.json").read_text())
        return cls(root, Path(d["run"]), Path(d["states"]), Path(d["signing_key"]), d["device_ids"], d["trained"],
                   d["seconds"])


def build_fleet(root: Path, devices: int, *, train_per_device: int = 20, test_per_device: int = 5,
                seed: int = 0, epochs: int = 2, width: int = 8, val_fraction: float = 0.05) -> Fleet:
    """``devices`` devices with ``train_per_device`` contributed and ``test_per_device`` held-out Fashion-MNIST
    images each, their states, and the server's run trained on the union with provenance (see the module doc).
    Reuses ``root`` when it already holds a fleet of this size."""
    import edge_qmul as eq
    from edge_qmul import content, data
    from edge_qmul.cli import main as cli

    if (root / "fleet.json").exists():
        fleet = Fleet.load(root)
        if len(fleet.device_ids) == devices:
            return fleet
        raise RuntimeError(f"{root} holds a fleet of {len(fleet.device_ids)} devices, not {devices}")
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    images, labels = fashion_pool()
    need = devices * (train_per_device + test_per_device) + SERVER_TEST
    if need > len(images):
        raise ValueError(f"{devices} devices x {train_per_device + test_per_device} images + {SERVER_TEST} need "
                         f"{need} distinct Fashion-MNIST images; there are {len(images)}")
    if train_per_device < len(classes_of(labels)):
        raise ValueError(f"train_per_device={train_per_device}: a device's x_train must hold every class "
                         f"({len(classes_of(labels))}), as the .npz loader requires")
    # Class queues in seeded order; each device takes its samples class by class in turn, so its x_train holds
    # every class (the .npz loader requires it) and the devices' data are disjoint.
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == k))) for k in classes_of(labels)]
    turn = 0

    def take(count: int) -> list[int]:
        nonlocal turn
        out = []
        while len(out) < count:
            queue = queues[turn % len(queues)]
            turn += 1
            if queue:
                out.append(int(queue.pop()))
        return out

    classes = np.array(data.FASHION_MNIST_CLASSES)
    (root / "data").mkdir(exist_ok=True)
    device_files = []
    contributed: list[int] = []
    for pid in range(devices):
        tr, te = take(train_per_device), take(test_per_device)
        path = root / "data" / f"device-{pid}.npz"
        np.savez(path, x_train=images[tr], y_train=labels[tr], x_test=images[te], y_test=labels[te], classes=classes)
        device_files.append(path)
        contributed += tr
    server_test = take(SERVER_TEST)
    server_npz = root / "data" / "server.npz"
    np.savez(server_npz, x_train=images[contributed], y_train=labels[contributed], x_test=images[server_test],
             y_test=labels[server_test], classes=classes)
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    keys = root / "keys"
    if cli(["keygen", "--out", str(keys)]) != 0:
        raise RuntimeError("edge-qmul keygen failed")
    fleet_key = (keys / "public_key.hex").read_text().strip()
    states = root / STATES
    device_ids = [DeviceState.init(states / f"device-{pid}", DataSpec("npz", f), fleet_key).device_id
                  for pid, f in enumerate(device_files)]
    seconds["device_init"] = time.perf_counter() - t

    # Provenance: each device's contributed samples that the server's split keeps for training (the split
    # holds val_fraction of them out for validation; those were never trained on and cannot be forgotten).
    t = time.perf_counter()
    data_cfg = eq.DataConfig(dataset="npz", root=str(server_npz), seed=seed, val_fraction=val_fraction)
    source = data.load_dataset("npz", server_npz)
    split = data.make_split(source, seed, val_fraction=val_fraction)
    ids = data.content_ids(source.train)
    in_train = {ids[i] for i in split.train}
    trained = [[h for h in ids[pid * train_per_device:(pid + 1) * train_per_device] if h in in_train]
               for pid in range(devices)]
    rows = ["device_id,sha256"] + [f"{device_ids[pid]},{h}" for pid in range(devices) for h in trained[pid]]
    (root / "provenance.csv").write_text("\n".join(rows) + "\n")
    assert all(content.is_sha256_hex(h) for h in ids)
    run = root / "run"
    eq.Run(run).train(data_cfg, eq.TrainConfig(epochs=epochs, width=width, seed=seed),
                      provenance=root / "provenance.csv")
    eq.Run(run).quantize()
    seconds["train"] = time.perf_counter() - t
    fleet = Fleet(root, run, states, keys / "signing_key.pem", device_ids, trained, seconds)
    fleet.save()
    return fleet


# --------------------------------------------------------------------------------------------------
# One experiment on a copy of the template
# --------------------------------------------------------------------------------------------------


@dataclass
class FleetCopy:
    root: Path
    run: Path
    state_root: Path  # the run config's state-root
    size: int
    fleet: Fleet
    filed: dict[int, list[str]] = field(default_factory=dict)  # partition id -> request ids it filed

    def state_dir(self, pid: int) -> Path:
        return self.state_root / f"device-{pid}"

    def device(self, pid: int) -> DeviceState:
        return DeviceState(self.state_dir(pid))


def fleet_copy(fleet: Fleet, dst: Path, size: int) -> FleetCopy:
    """A fresh run (empty ledger) and the first ``size`` devices' states under ``dst``."""
    if size > len(fleet.device_ids):
        raise ValueError(f"the template has {len(fleet.device_ids)} devices, not {size}")
    dst.mkdir(parents=True)
    shutil.copytree(fleet.run, dst / "run")
    for pid in range(size):
        shutil.copytree(fleet.states / f"device-{pid}", dst / STATES / f"device-{pid}")
    return FleetCopy(dst, dst / "run", dst / STATES, size, fleet)


def file_requests(copy: FleetCopy, per_device: int, hashes_per_request: int = 1) -> int:
    """Each device files ``per_device`` requests, each naming ``hashes_per_request`` of its own trained samples
    (distinct across its requests); returns the number filed."""
    for pid in range(copy.size):
        own = copy.fleet.trained[pid]
        if len(own) < per_device * hashes_per_request:
            raise ValueError(f"device {pid} has {len(own)} trained samples; {per_device} requests of "
                             f"{hashes_per_request} need {per_device * hashes_per_request}")
        with copy.device(pid) as dev:
            copy.filed[pid] = [dev.forget(hashes=own[k * hashes_per_request:(k + 1) * hashes_per_request]).request_id
                               for k in range(per_device)]
    return sum(len(v) for v in copy.filed.values())


# --------------------------------------------------------------------------------------------------
# Running the apps under the simulation engine
# --------------------------------------------------------------------------------------------------


def _repo() -> Path:
    return Path(__file__).resolve().parents[2]


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


def current_rss_mb() -> float:
    return rss_mb(os.getpid())


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


class RssSampler:
    """Peak of the summed RSS of the processes ``pids()`` names, sampled every ``interval`` seconds in a thread
    while the ``with`` block runs (the server's peak memory over a round)."""

    def __init__(self, pids: Any, interval: float = 0.25) -> None:
        self.pids, self.interval, self.peak_mb = pids, interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, sum(rss_mb(p) for p in self.pids()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# The engine's link state: Flower's in-memory one, with its per-node message lookup indexed
# --------------------------------------------------------------------------------------------------


def indexed_link_state_class() -> type:
    """``InMemoryLinkState`` with ``get_message_ins`` finding a node's messages through an index by destination.

    Why: the simulation engine's dispatcher (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``)
    calls ``get_message_ins(node, limit=1)`` for every virtual node every 0.1 s, and flwr 1.41's in-memory
    version walks the whole message store for each call, checking every stored message's validity (expiry,
    federation) under the state's lock. With one message per node in flight, a sweep over N nodes costs
    O(N^2): ~5 CPU-s of an 8 s empty round at 1,000 nodes (the profile: bench/results/fleet_scale.md),
    and while it holds the lock the engine's reply thread cannot store replies. Flower's SQL link state (what a
    real SuperLink runs) claims a node's messages through an index on the destination node
    (``idx_message_pending_dst_created_at``) and checks only those; this does the same in memory. Every other
    method is Flower's own, and ``get_message_ins`` returns what the original returns: the node's undelivered,
    still valid messages in the order they were stored, marked delivered. The difference is that it checks
    (and drops when expired) only the node's own messages, not every stored one on every call; the messages a
    lookup does not touch are checked when the server pulls their replies, as before.
    """
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.date import now

    class IndexedLinkState(InMemoryLinkState):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.waiting: dict[int, dict[str, None]] = {}  # node id -> ids of its messages not handed out, in order

        def store_message_ins(self, message: Any) -> str | None:
            with self.lock:
                message_id = super().store_message_ins(message)
                if message_id is not None:
                    self.waiting.setdefault(message.metadata.dst_node_id, {})[message_id] = None
            return message_id  # type: ignore[no-any-return]

        def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Any]:
            if limit is not None and limit < 1:
                raise AssertionError("`limit` must be >= 1")
            found: list[Any] = []
            with self.lock:
                waiting = self.waiting.get(node_id, {})
                self._check_stored_messages(set(waiting))  # drops this node's expired or invalid messages
                for message_id in list(waiting):
                    message = self.message_ins_store.get(message_id)
                    if message is None or message.metadata.delivered_at != "":
                        del waiting[message_id]  # gone or handed out: never a candidate again
                        continue
                    if run_id is None or message.metadata.run_id == run_id:
                        found.append(message)
                        del waiting[message_id]
                    if limit and len(found) == limit:
                        break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
            return found

    return IndexedLinkState


@contextmanager
def indexed_link_state() -> Iterator[None]:
    """Within the block, the simulation engine's link state factory makes ``indexed_link_state_class()``
    states (the engine makes its in-memory state through ``LinkStateFactory``; nothing else changes)."""
    from flwr.server.superlink.linkstate import linkstate_factory

    original = linkstate_factory.InMemoryLinkState
    linkstate_factory.InMemoryLinkState = indexed_link_state_class()  # type: ignore[misc]
    try:
        yield
    finally:
        linkstate_factory.InMemoryLinkState = original  # type: ignore[misc]


@dataclass
class SimResult:
    wall_seconds: float
    rss_before_mb: float
    peak_rss_mb: float  # sampled while the simulation ran (the server thread's process)
    warmup_seconds: float = 0.0  # engine start-up: Ray, its actors, the ClientApp import (before the app's rounds)


def warmed_server_app(warm_nodes: int, record: dict[str, float]) -> Any:
    """The production ServerApp behind a warm-up: the simulation engine starts Ray and its actors while the
    ServerApp already sends, so the app's first message round would carry ~20 s of start-up. The warm-up asks
    ``warm_nodes`` devices the read-only rollout ``status`` query (the production handler; nothing on the
    device changes) and records its duration in ``record["warmup"]``; then the production app runs unchanged."""
    from edge_qmul.federated import rollout, server_app
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.serverapp import ServerApp

    wrapper = ServerApp()

    @wrapper.main()
    def main(grid: Any, context: Any) -> None:
        t = time.perf_counter()
        while len(grid.get_node_ids()) < warm_nodes and time.perf_counter() - t < 600:
            time.sleep(0.2)  # the engine registers its virtual nodes after the ServerApp thread starts
        nodes = sorted(grid.get_node_ids())[:warm_nodes]
        status = RecordDict({"rollout": ConfigRecord({"phase": "status"})})
        grid.send_and_receive([Message(status, n, rollout.QUERY_ROLLOUT) for n in nodes], timeout=600)
        record["warmup"] = time.perf_counter() - t
        server_app.app(grid, context)

    return wrapper


def simulate(copy: FleetCopy, run_config: dict[str, Any], *, actors: int = 2, object_store_mb: int = 256,
             warm_up: bool = True, indexed: bool = True) -> SimResult:
    """Run the production ServerApp and ClientApp under Flower's simulation engine with ``copy.size`` virtual
    SuperNodes, ``run_config`` over the pyproject's defaults (as ``flwr run -c`` does; ``run-dir``,
    ``state-root`` and ``num-clients`` are set here). ``actors`` Ray actors run the ClientApps (one CPU each).

    The engine is Flower's own (``flwr.simulation.run_simulation._run_simulation``, the function behind both
    ``run_simulation`` and ``flwr run`` on a simulation SuperLink); it is called directly because the public
    wrapper takes no run config. A ServerApp failure is raised here. ``warm_up``: see ``warmed_server_app``.
    ``indexed``: the engine's link state looks a node's messages up by destination (``indexed_link_state_class``:
    Flower's stock in-memory state costs O(N^2) per round of N nodes); False runs Flower's stock state.
    """
    from edge_qmul.federated import client_app, server_app
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    override = {"run-dir": str(copy.run), "state-root": str(copy.state_root), "num-clients": copy.size,
                **run_config}
    fused = get_fused_config_from_dir(_repo(), override)  # unknown keys are refused by FederatedConfig
    # The run as _run_simulation makes it when given none, plus the run config (its override_config)
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.override_config = override
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=fused)
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": actors, "num_gpus": 0, "object_store_memory": object_store_mb * 2**20,
                      "logging_level": "error", "log_to_driver": True, "include_dashboard": False},
    }
    before = current_rss_mb()
    record: dict[str, float] = {}
    app = warmed_server_app(min(copy.size, 2 * actors), record) if warm_up else server_app.app
    t = time.perf_counter()
    with RssSampler(lambda: [os.getpid()]) as rss, indexed_link_state() if indexed else nullcontext():
        _run_simulation(num_supernodes=copy.size, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        client_app=client_app.app, server_app=app, backend_config=backend_config,
                        server_app_context=context, app_dir=str(_repo()), run=run, is_app=True)
    return SimResult(time.perf_counter() - t, before, rss.peak_mb, record.get("warmup", 0.0))


# --------------------------------------------------------------------------------------------------
# Accounting: lost and duplicated requests
# --------------------------------------------------------------------------------------------------


@dataclass
class Audit:
    filed: int  # requests the devices filed (their own queues)
    ledger_rows: int
    distinct_ids: int  # distinct request ids in the ledger
    acknowledged: int  # filed requests the device records as acknowledged or honoured
    lost: int  # filed, but not in the ledger, or in it while the device still waits for an answer
    duplicated: int  # ledger rows beyond one per request id, plus rows no device filed
    refused: int  # filed requests the server refused (expected 0 here: every request names a trained sample)
    statuses: dict[str, int]
    models: dict[str, int]  # active model version -> devices running it

    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.refused == 0 and self.acknowledged == self.filed


def audit(copy: FleetCopy) -> Audit:
    """Compare the forget ledger with what every device filed, from both sides' own records."""
    import edge_qmul as eq

    with eq.Run(copy.run).ledger() as ledger:
        rows = ledger.requests()
    ids = Counter(r.request_id for r in rows)
    statuses: Counter[str] = Counter()
    models: Counter[str] = Counter()
    filed = acknowledged = lost = refused = 0
    filed_ids: set[str] = set()
    for pid in range(copy.size):
        with copy.device(pid) as dev:
            for r in dev.requests():
                filed += 1
                filed_ids.add(r.request_id)
                statuses[r.status] += 1
                acknowledged += r.status in ("acknowledged", "honoured")
                refused += r.status == "refused"
                lost += ids.get(r.request_id, 0) == 0 or r.status in ("pending", "sent")
            m = dev.models()
            models[m[0].version if m else ""] += 1
    duplicated = sum(c - 1 for c in ids.values()) + len(set(ids) - filed_ids)
    return Audit(filed, len(rows), len(ids), acknowledged, lost, duplicated, refused, dict(statuses), dict(models))


def add_tests_to_path() -> None:
    """For scripts under bench/: make ``fleet.*`` importable (pytest does it for tests)."""
    tests = str(_repo() / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


# --------------------------------------------------------------------------------------------------
# The whole protocol on one fleet: intake, central unlearning with receipts, a bundle, a 3-wave rollout
# --------------------------------------------------------------------------------------------------

WAVES = "5,25,100"
# The bundle's validation budgets: this harness measures the protocol, not the model; the fleet-scale model
# forgets half its training set in one go and is shipped whatever its metrics.
LOOSE_BUDGETS = "[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\nta_drop = 100\n"

Runner = Any  # (run config dict) -> SimResult: one run of the apps on the fleet (simulation or loopback)

# The bundle's device profile: the reference x86 profile with one thread and a latency budget of a second. The
# virtual devices (and the real SuperNodes here) share two loaded cores, so an on-board p95 of a few ms is not
# what a fleet-scale run can promise (12 ms was seen against the x86 profile's 5 ms); the check still runs.
VIRTUAL_DEVICE = """name = "virtual-device"
description = "A simulated fleet device: one of many sharing this machine's cores (fleet-scale harness)"
arch = "x86_64"
cpu = "x86-64-v2"
cores = 1
isa = ["avx2"]
ram_mb = 1024
providers = ["CPUExecutionProvider"]
threads = 1
quant_engine = "x86"
latency_budget_ms = 1000.0
memory_budget_mb = 1024.0
"""


def simulation_runner(copy: FleetCopy, actors: int = 2, indexed: bool = True) -> Runner:
    return lambda run_config: simulate(copy, run_config, actors=actors, indexed=indexed)


def make_bundle(copy: FleetCopy, method: str = "qmul") -> Path:
    """Validate (loose budgets) and sign the run's current ``method`` result with the fleet's key."""
    from edge_qmul.cli import main as cli

    budgets = copy.root / "loose-budgets.toml"
    budgets.write_text(LOOSE_BUDGETS)
    profile = copy.root / "virtual-device.toml"
    profile.write_text(VIRTUAL_DEVICE)
    out = copy.root / f"{method}.bundle.tar"
    for argv in (["validate", "--run", str(copy.run), "--device", str(profile), "--budgets", str(budgets),
                  "--method", method],
                 ["bundle", "--run", str(copy.run), "--device", str(profile), "--key", str(copy.fleet.signing_key),
                  "--out", str(out)]):
        if cli(argv) != 0:
            raise RuntimeError(f"edge-qmul {' '.join(argv)} failed")
    return out


def _newest(folder: Path, pattern: str) -> dict[str, Any]:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"no {pattern} in {folder}: the ServerApp wrote no summary")
    return dict(json.loads(files[-1].read_text()))


def run_protocol(copy: FleetCopy, runner: Runner, per_device: int, *, reply_timeout: float = 3600.0,
                 max_forget_auc: float = 1.0, log: Any = print) -> dict[str, Any]:
    """File ``per_device`` requests on every device, then three runs of the apps: ``intake`` (collect, verify,
    record, acknowledge), ``central`` (nothing new to collect; Q-MUL on the server, receipts to the devices),
    and ``rollout`` of the signed result in waves ``WAVES``. Returns each run's figures and the audits."""
    from edge_qmul.export.bundle import read_manifest

    out: dict[str, Any] = {"devices": copy.size, "requests_per_device": per_device}
    t = time.perf_counter()
    out["filed"] = file_requests(copy, per_device)
    out["file_seconds"] = time.perf_counter() - t
    log(f"{copy.size} devices: filed {out['filed']} requests in {out['file_seconds']:.1f}s")
    common = {"reply-timeout": reply_timeout, "connect-timeout": 600.0}

    sim = runner({"mode": "intake", **common})
    summary = _newest(copy.run / "federated", "round-*.json")
    busy = summary["seconds"]["collect"] + summary["seconds"]["ack"]
    out["intake"] = {"wall_seconds": sim.wall_seconds, "peak_rss_mb": sim.peak_rss_mb, "summary": summary,
                     "warmup_seconds": sim.warmup_seconds,
                     "intake_seconds": busy, "requests_per_second": summary["accepted"] / busy if busy else 0.0}
    out["audit_after_intake"] = asdict(audit(copy))
    log(f"intake: {summary['accepted']} accepted in {busy:.1f}s ({out['intake']['requests_per_second']:.1f}/s), "
        f"wall {sim.wall_seconds:.1f}s, peak RSS {sim.peak_rss_mb:.0f} MiB; {out['audit_after_intake']}")

    sim = runner({"mode": "central", **common})
    summary = _newest(copy.run / "federated", "round-*.json")
    out["central"] = {"wall_seconds": sim.wall_seconds, "peak_rss_mb": sim.peak_rss_mb, "summary": summary}
    log(f"central: model {summary['model_version']} honours {summary['honoured']}; receipts {summary['receipts']}; "
        f"{summary['seconds']}")

    bundle = make_bundle(copy)
    version = read_manifest(bundle)["model_version"]
    out["bundle"] = {"model_version": version, "bytes": bundle.stat().st_size}
    # max-forget-auc 1: every device still runs its forget check and reports it (counted below by level), but
    # with a handful of samples per device the AUC is mostly noise, and a protocol load test must not stop on it
    sim = runner({"mode": "rollout", "bundle": str(bundle), "waves": WAVES, "max-forget-auc": max_forget_auc,
                  **common})
    summary = _newest(copy.run / "rollouts", "*.json")
    out["rollout"] = {"wall_seconds": sim.wall_seconds, "peak_rss_mb": sim.peak_rss_mb, "status": summary["status"],
                      "status_seconds": summary.get("status_seconds"),
                      "waves": [{"wave": w["wave"], "percent": w["percent"], "devices": len(w["devices"]),
                                 "passed": len(w["passed"]), "seconds": w.get("seconds")} for w in summary["waves"]],
                      "forget_check_levels": dict(Counter(c["level"] for w in summary["waves"]
                                                          for c in w["forget_checks"].values())),
                      "warmup_seconds": sim.warmup_seconds}
    final = audit(copy)
    out["audit"] = asdict(final)
    out["on_new_model"] = final.models.get(version, 0)
    log(f"rollout {summary['status']}: {out['rollout']['waves']}; {out['on_new_model']}/{copy.size} devices on "
        f"{version}; final audit {out['audit']}")
    return out
