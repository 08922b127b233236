"""Central versus federated Q-MUL on the same device-filed requests (Fashion-MNIST, small CNN, int8).

Every device is its own state (``DeviceState``) over its own ``.npz``; the forget samples never leave it.

1. The Fashion-MNIST training file (exact duplicates dropped: a content id names one image) is split IID over
   ``--clients`` devices: device i's ``x_train`` is its share (what it contributes), its ``x_test`` a slice of
   the test file (its held-out pool). Each device is set up with ``DeviceState.init``. The server's data is
   the union of the contributions plus the test file; the server trains and quantizes the small CNN on it
   (default recipe, seed 0) with a provenance CSV naming each device's trained samples by content id.
2. The fleet runs the quantized model: its int8 ONNX and ``features.onnx`` are exported and installed into
   every device's state dir (``DeviceState.install_model``), as a rollout leaves them.
3. Each device files ``--requests`` signed requests of ``--samples`` of its trained samples
   (``DeviceState.forget``); one ``intake`` round of the real ServerApp / ClientApp code through the
   in-process Grid (Flower's serialization, no SuperLink) records and acknowledges them.
4. Federated Q-MUL (``strategy.run_fedqmul``: the ``FedQMul`` Flower strategy, one Q-MUL epoch per round)
   with the devices' own features, forget and retain sets; then, on the same ledger, central Q-MUL (the
   server's copy of the data) and retrain (the reference).
5. Print and write the table (FA, RA, TA, MIA, Avg Gap to retrain, seconds), the federated round log and the
   provenance of the numbers (commit, package versions, seed, date).

    python bench/federated_modes.py          # ~10 min on 2 cores; writes bench/results/federated_modes.*

The devices run one after another in this process, so the federated wall time is the sum of every
device's work plus the server's, not what a fleet running in parallel would see.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_qmul.devices.state import DataSpec, DeviceState
from edge_qmul.export.onnx_export import export_models
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import run_round
from edge_qmul.federated.strategy import run_fedqmul

from edge_qmul import data, pipeline, quant
from edge_qmul.config import DataConfig, QuantConfig, method_config
from edge_qmul.demo import format_table
from edge_qmul.run import model_version, sha256_file
from edge_qmul.train import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (they do not ship)
from fleet.inprocess import NODE, act_as_flower_process, local_grid  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
SEED = 0


def fleet_data(root: Path, clients: int, held_out: int) -> tuple[list[Path], Path]:
    """Per-device .npz files (IID shares of the training file) and the server's .npz (their union + the test file)."""
    source = data.load_dataset("fashion-mnist", FASHION)
    assert source.test is not None
    seen: set[str] = set()
    keep = []
    for i, image in enumerate(source.train.images):
        h = hashlib.sha256(image.tobytes()).hexdigest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    order = np.random.default_rng(SEED).permutation(np.asarray(keep))
    classes = np.array(data.FASHION_MNIST_CLASSES)
    root.mkdir(parents=True, exist_ok=True)
    files, shares = [], []
    for k in range(clients):
        share = np.sort(order[k::clients])
        test = np.arange(k * held_out, (k + 1) * held_out)
        path = root / f"device-{k}.npz"
        np.savez(path, x_train=source.train.images[share], y_train=source.train.labels[share],
                 x_test=source.test.images[test], y_test=source.test.labels[test], classes=classes)
        files.append(path)
        shares.append(share)
    union = np.concatenate(shares)
    server = root / "server.npz"
    np.savez(server, x_train=source.train.images[union], y_train=source.train.labels[union],
             x_test=source.test.images, y_test=source.test.labels, classes=classes)
    return files, server


def install_quantized_model(run: Path, states: list[Path], out: Path) -> str:
    """Export the run's quantized int8 model and its features.onnx; install them on every device (a rollout's
    result); returns the model version."""
    q = pipeline.load_quantized(run)
    cfg = q.model_cfg
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    out.mkdir(parents=True, exist_ok=True)
    features = quant.features_of_int8(q.int8, dequantize=True, head=cfg.head)
    export_models(q.int8, q.float_model, out / "model.int8.onnx", out / "model.fp32.onnx", shape,
                  {"method": "quantized"}, features=features, features_path=out / "features.onnx")
    (out / "model.fp32.onnx").unlink()
    version = model_version("quantized", sha256_file(out / "model.int8.onnx"))
    for state in states:
        with DeviceState.open(state) as d:
            d.install_model(version, out)
    return version


def provenance_info() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "commit": run("git", "rev-parse", "HEAD"),
        "dirty": bool(run("git", "status", "--porcelain", "--", "federated", "edge_qmul", "export", "devices",
                          "bench/federated_modes.py", "tests/fleet")),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "seed": SEED, "python": platform.python_version(),
        "versions": {p: metadata.version(p) for p in ("edge-qmul", "torch", "flwr", "onnxruntime", "numpy")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-fed"), help="fleet, states and run (recreated)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per device")
    parser.add_argument("--samples", type=int, default=300, help="samples per request")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out test images per device")
    parser.add_argument("--server-lr", type=float, default=1.0, help="server step towards the average (1 = FedAvg)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine busy with other work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    act_as_flower_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "edge_qmul.federated.receive"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seconds: dict[str, float] = {}
    prov = provenance_info()  # of the code as it starts

    if args.work.exists():
        shutil.rmtree(args.work)
    t = time.perf_counter()
    files, server = fleet_data(args.work / "data", args.clients, args.held_out)
    fleet_key = "".join(f"{b:02x}" for b in _fleet_public_key(args.work))
    states = [args.work / "states" / f"device-{k}" for k in range(args.clients)]
    device_ids = []
    for state, f in zip(states, files, strict=True):
        with DeviceState.init(state, DataSpec("npz", f), fleet_key) as d:
            device_ids.append(d.device_id)
    source = data.load_dataset("npz", server)
    split = data.make_split(source, SEED, val_fraction=0.1)
    ids = data.content_ids(source.train)
    in_train = {ids[i] for i in split.train}
    trained: list[list[str]] = []
    rows = ["device_id,sha256"]
    for device, f in zip(device_ids, files, strict=True):
        mine = [h for h in data.content_ids(data.load_dataset("npz", f).train) if h in in_train]
        trained.append(mine)
        rows += [f"{device},{h}" for h in mine]
    (args.work / "provenance.csv").write_text("\n".join(rows) + "\n")
    seconds["fleet"] = time.perf_counter() - t

    run = args.work / "run"
    t = time.perf_counter()
    pipeline.train(run, DataConfig(dataset="npz", root=str(server), seed=SEED), TrainConfig(seed=SEED),
                   provenance=args.work / "provenance.csv", quiet=True)
    pipeline.quantize(run, QuantConfig(), quiet=True)
    seconds["train_quantize"] = time.perf_counter() - t
    version = install_quantized_model(run, states, args.work / "shipped")

    rng = np.random.default_rng(SEED)
    for state, mine in zip(states, trained, strict=True):
        chosen = rng.permutation(len(mine))[: args.requests * args.samples]
        with DeviceState.open(state) as d:
            for r in range(args.requests):
                d.forget(hashes=[mine[i] for i in chosen[r * args.samples:(r + 1) * args.samples]])
    config: dict[str, object] = {"mode": "intake", "server-lr": args.server_lr, "reply-timeout": 3600.0}
    grid = local_grid(run.resolve(), [s.resolve() for s in states], config)
    cfg = FederatedConfig.from_run_config(grid.contexts[NODE].run_config)
    t = time.perf_counter()
    intake = run_round(grid, cfg)
    seconds["intake"] = time.perf_counter() - t
    if intake.accepted != args.clients * args.requests:
        print(f"intake recorded {intake.accepted} of {args.clients * args.requests} requests; see the log above",
              file=sys.stderr)
        return 1

    participants = {NODE + k: device for k, device in enumerate(device_ids)}
    t = time.perf_counter()
    record = run_fedqmul(grid, cfg, participants, model_version=version)
    seconds["federated"] = time.perf_counter() - t
    if record is None:
        print("federated mode made no model; see the log above", file=sys.stderr)
        return 1
    pipeline.run_unlearn(run, method_config("qmul"), quiet=True)
    pipeline.run_unlearn(run, method_config("retrain"), quiet=True)
    report = pipeline.evaluate(run, ["retrain", "qmul", "fedqmul"])
    table = format_table(report)
    fed_log = json.loads((run / "unlearn" / "fedqmul" / "log.json").read_text())["log"]
    print(table)
    rows_ = report.methods
    print(f"Avg Gap to retrain: central qmul {rows_['qmul']['avg_gap']:.2f}, "
          f"federated {rows_['fedqmul']['avg_gap']:.2f}")

    caches = {s.name: sum(p.stat().st_size for p in (s / "fedqmul").glob("*.npz")) for s in states}
    result: dict[str, Any] = {
        "provenance": prov,
        "clients": args.clients,
        "requests": intake.accepted,
        "forget_count": report.forget_count,
        "device_samples": [len(t_) for t_ in trained],
        "features_version": version,
        "seconds": seconds,
        "intake": {k: v for k, v in vars(intake).items() if k != "seconds"},
        "report": report,
        "federated_rounds": fed_log["rounds"],
        "federated_final": fed_log["final"],
        "device_feature_cache_bytes": caches,
        "qmul_config": fed_log["config"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federated_modes.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    rounds_md = "\n".join(
        f"| {r['epoch']} | {r['lr']:.4f} | {r['server_lr']:.0f} | {r['w_f']:.3f} | {r['w_r']:.3f} | "
        f"{r['forget_acc']:.2f} | {r['retain_acc']:.2f} |"
        for r in fed_log["rounds"]
    )
    final = fed_log["final"]
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    (args.out / "federated_modes.md").write_text(
        f"# Central vs federated Q-MUL, Fashion-MNIST, {args.clients} devices, small CNN, int8 (x86)\n\n"
        f"Each device is a `DeviceState` over its own `.npz` (an IID share of the Fashion-MNIST training file, "
        f"exact duplicates dropped; {args.held_out} test images as its held-out pool); the server trained the "
        "small CNN (default recipe) on the union with a provenance CSV by content id. The devices run the "
        f"quantized model ({version}), installed with its `features.onnx` in their state dirs. "
        f"{intake.accepted} device-filed requests ({report.forget_count} samples) were recorded in one intake "
        "round through the in-process Grid (the real app code and Flower serialization; no SuperLink). "
        "Federated Q-MUL ran as the `FedQMul` strategy: each device resolved its request ids to its own samples "
        "and computed their features with `features.onnx` on its own pixels; only the classifier head's QAT "
        "state and statistics travelled. Central Q-MUL and retrain ran on the same ledger. Federated seconds: "
        "the devices ran one after another in one process.\n\n"
        f"```\n{table}\n```\n\n"
        f"Avg Gap to retrain: central Q-MUL {rows_['qmul']['avg_gap']:.2f}, federated Q-MUL "
        f"{rows_['fedqmul']['avg_gap']:.2f}.\n\n"
        "Federated rounds (statistics measured by the devices at the round's broadcast weights; the last row is "
        "the devices' look after the final round):\n\n"
        "| round | lr | server lr | w_f | w_r | forget acc | retain acc |\n|---|---|---|---|---|---|---|\n"
        f"{rounds_md}\n| final | | | | | {final['forget_acc']:.2f} | {final['retain_acc']:.2f} |\n\n"
        f"Provenance: commit {prov['commit'][:12]}{' (+ uncommitted changes)' if prov['dirty'] else ''}, "
        f"{versions}; Python {prov['python']}, {prov['machine']}; seed {SEED}; {prov['date']}. "
        "`python bench/federated_modes.py` regenerates this file.\n"
    )
    return 0


def _fleet_public_key(work: Path) -> bytes:
    """A fleet signing key for the devices to pin (the bench ships no bundle; the key only has to be valid)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    del work
    return Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dict__"):
        return vars(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


if __name__ == "__main__":
    sys.exit(main())
