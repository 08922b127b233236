"""Central versus federated Q-MUL on the same device-filed requests (Fashion-MNIST, small CNN, int8).

Every device is its own state (``DeviceState``) over its own ``.npz``; the forget samples never leave it.

1. The Fashion-MNIST training file (exact duplicates dropped: a content id names one image) is split IID over
   ``--clients`` devices: device i's ``x_train`` is its share (what it contributes), its ``x_test`` a slice of
   the test file (its held-out pool). Each device is set up with ``DeviceState.init``. The server's data is
   the union of the contributions plus the test file; the server trains and quantizes the small CNN on it
   (default recipe, seed 0) with a provenance CSV naming each device's trained samples by content id.
   The fleet runs the quantized model: its int8 ONNX and ``features.onnx`` are installed into every device's
   state dir (``DeviceState.install_model``), as a rollout leaves them. All of this is WORK/base (``prepare``;
   ``--reuse`` takes an earlier one made with the same setting).
2. A forget set is a copy of the base's run and device states where each device files ``--requests`` signed
   requests of ``--samples`` of its trained samples (``DeviceState.forget``) and one ``intake`` round of the
   real ServerApp / ClientApp code through the in-process Grid (Flower's serialization, no SuperLink) records
   and acknowledges them.
3. Tuning (DESIGN.md §4.4): on ``--tuning-sets`` forget sets disjoint from the reported one, with their own
   retrain references and the validation split in place of the test split, every configuration of
   ``FED_GRID`` (federated: lr, rounds, local epochs) and ``CENTRAL_GRID`` (central: lr, epochs; as many) is
   scored by its mean Avg Gap; each mode's best is its tuned configuration. ``--tuning-only`` stops there
   (OUT/federated_modes_tuning.json); ``--tuning FILE`` takes that file instead of tuning again.
4. On the reported forget set: retrain (the reference), central Q-MUL at its default and tuned configuration,
   federated Q-MUL (``strategy.run_fedqmul``: the ``FedQMul`` Flower strategy) as it was before
   (``FED_BEFORE``), at the shipped defaults and tuned; FA, RA, TA, MIA and Avg Gap on the test split.
5. Write the tables, the federated round logs and the provenance of the numbers (commit, package versions,
   seed, date, command).

    python bench/federated_modes.py --threads 1        # ~1 h on 2 busy cores; writes bench/results/federated_modes.*

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
from collections.abc import Mapping
from dataclasses import dataclass
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
from edge_qmul.federated.strategy import FEDERATED_RECIPE, LOCAL_EPOCHS, run_fedqmul

from edge_qmul import data, pipeline, quant
from edge_qmul.config import DataConfig, QMul, QuantConfig, method_config
from edge_qmul.metrics import EvalSets, avg_gap, evaluate_model
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


@dataclass
class Base:
    """The fleet and the server's trained, quantized run, before any request (``prepare``)."""

    root: Path
    device_ids: list[str]
    trained: list[list[str]]  # per device: its samples in the server's training split (provenance order)
    version: str  # the installed quantized model
    seconds: dict[str, float]
    made: dict[str, Any]  # commit and date of the code that made it (``provenance_info``)


def prepare(root: Path, clients: int, held_out: int, reuse: bool) -> Base:
    """Fleet data, device states, the trained and quantized run, the model installed on every device. With
    ``reuse``, an earlier ``root`` made with the same setting is taken as it is (``base.json`` is written last,
    so a half-made one is never reused)."""
    setting = {"clients": clients, "held_out": held_out, "seed": SEED, "dataset": "fashion-mnist",
               "recipe": "small_cnn default TrainConfig, default QuantConfig"}
    meta = root / "base.json"
    if reuse and meta.exists():
        info = json.loads(meta.read_text())
        if info["setting"] == setting:
            logging.getLogger(__name__).info("reusing the trained fleet in %s", root)
            return Base(root, info["device_ids"], info["trained"], info["version"], info["seconds"],
                        info.get("made", {}))
    if root.exists():
        shutil.rmtree(root)
    seconds: dict[str, float] = {}
    made = provenance_info()
    t = time.perf_counter()
    files, server = fleet_data(root / "data", clients, held_out)
    fleet_key = "".join(f"{b:02x}" for b in _fleet_public_key(root))
    states = [root / "states" / f"device-{k}" for k in range(clients)]
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
    (root / "provenance.csv").write_text("\n".join(rows) + "\n")
    seconds["fleet"] = time.perf_counter() - t
    run = root / "run"
    t = time.perf_counter()
    pipeline.train(run, DataConfig(dataset="npz", root=str(server), seed=SEED), TrainConfig(seed=SEED),
                   provenance=root / "provenance.csv", quiet=True)
    pipeline.quantize(run, QuantConfig(), quiet=True)
    seconds["train_quantize"] = time.perf_counter() - t
    version = install_quantized_model(run, states, root / "shipped")
    meta.write_text(json.dumps({"setting": setting, "device_ids": device_ids, "trained": trained, "version": version,
                                "seconds": seconds, "made": made}))
    return Base(root, device_ids, trained, version, seconds, made)


def choose(trained: list[list[str]], count: int, seed: int, exclude: list[np.ndarray] | None = None
           ) -> list[np.ndarray]:
    """Per device, ``count`` positions in its trained samples drawn with one generator (``seed``), none of
    ``exclude``'s. Seed 0 without exclusions is the draw the reported forget set has always used."""
    rng = np.random.default_rng(seed)
    out = []
    for k, mine in enumerate(trained):
        order = rng.permutation(len(mine))
        if exclude is not None:
            order = order[~np.isin(order, exclude[k])]
        out.append(order[:count])
    return out


@dataclass
class Session:
    """One forget set on a copy of the base: the run, its devices and the in-process Grid to them."""

    run: Path
    grid: Any
    cfg: FederatedConfig
    participants: dict[int, str]
    intake: Any
    intake_seconds: float


def forget_set(base: Base, dest: Path, chosen: list[np.ndarray], requests: int, samples: int) -> Session:
    """Copy the base's run and device states to ``dest``; every device files ``requests`` requests of ``samples``
    of its chosen samples; one intake round records and acknowledges them."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(base.root / "run", dest / "run")
    shutil.copytree(base.root / "states", dest / "states")
    states = [dest / "states" / f"device-{k}" for k in range(len(base.device_ids))]
    for state, mine, idx in zip(states, base.trained, chosen, strict=True):
        with DeviceState.open(state) as d:
            for r in range(requests):
                d.forget(hashes=[mine[i] for i in idx[r * samples:(r + 1) * samples]])
    config: dict[str, object] = {"mode": "intake", "reply-timeout": 3600.0}
    run = (dest / "run").resolve()
    grid = local_grid(run, [s.resolve() for s in states], config)
    cfg = FederatedConfig.from_run_config(grid.contexts[NODE].run_config)
    t = time.perf_counter()
    intake = run_round(grid, cfg)
    seconds = time.perf_counter() - t
    if intake.accepted != len(states) * requests:
        raise SystemExit(f"intake recorded {intake.accepted} of {len(states) * requests} requests; see the log above")
    return Session(run, grid, cfg, {NODE + k: d for k, d in enumerate(base.device_ids)}, intake, seconds)


class Evaluator:
    """FA, RA, MIA and the held-out accuracy (``holdout``: "test", or "val" standing in for it while tuning) of a
    run's results; Avg Gap to its retrain result."""

    def __init__(self, run: Path, holdout: str) -> None:
        self.run = run
        self.q = pipeline.load_quantized(run)
        rd = pipeline.load_run_data(run)
        self.forget_ids = rd.split.forget
        self.sets = EvalSets(*rd.tensors("forget"), *rd.tensors("retain"), *rd.tensors(holdout))
        self.rows: dict[str, dict[str, float]] = {"none": {**evaluate_model(self.q.int8, self.sets), "seconds": 0.0}}

    def measure(self, method: str, name: str | None = None) -> dict[str, float]:
        model, meta = pipeline.load_result(self.run, method, self.q, self.forget_ids)
        row = {**evaluate_model(model, self.sets), "seconds": float(meta["seconds"])}
        self.rows[name or method] = row
        return row

    def gap(self, name: str) -> float:
        return avg_gap(self.rows[name], self.rows["retrain"])

    def table(self) -> str:
        header = f"{'method':<22}{'FA':>8}{'RA':>8}{'TA':>8}{'MIA':>8}{'AvgGap':>9}{'seconds':>10}"
        lines = [header, "-" * len(header)]
        for name, r in self.rows.items():
            lines.append(f"{name:<22}{r['FA']:8.2f}{r['RA']:8.2f}{r['TA']:8.2f}{r['MIA']:8.2f}{self.gap(name):9.2f}"
                         f"{r['seconds']:10.2f}")
        return "\n".join(lines)


# Tuning grids (DESIGN.md §4.4: the same number of configurations for both, chosen on the tuning forget set with
# the validation split standing in for the test split). Both see the same learning rates and the same numbers of
# passes over the data: federated rounds x local epochs per round = central epochs.
FED_GRID: list[dict[str, Any]] = [{"lr": lr, "epochs": e, "local_epochs": le}
                                  for lr in (0.3, 0.1) for e, le in ((5, 1), (10, 1), (5, 3), (10, 3))]
CENTRAL_GRID: list[dict[str, Any]] = [{"lr": lr, "epochs": e} for lr in (0.3, 0.1) for e in (5, 10, 15, 30)]


def fed_options(c: Mapping[str, Any]) -> dict[str, Any]:
    return {"unlearn": {"lr": c["lr"], "epochs": c["epochs"]}, "local_epochs": c["local_epochs"],
            "retain": c.get("retain", "trained")}


def label(c: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items())


def tune_set(base: Base, dest: Path, chosen: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Every grid point of both modes on one tuning forget set, scored by Avg Gap to its retrain with the validation
    split in place of the test split."""
    s = forget_set(base, dest, chosen, args.requests, args.samples)
    pipeline.run_unlearn(s.run, method_config("retrain"), quiet=True)
    ev = Evaluator(s.run, "val")
    ev.measure("retrain")
    out: dict[str, Any] = {"none": ev.rows["none"], "retrain": ev.rows["retrain"], "none_gap": ev.gap("none"),
                           "forget_count": len(ev.forget_ids), "fedqmul": [], "qmul": []}
    for c in FED_GRID:
        if run_fedqmul(s.grid, s.cfg, s.participants, model_version=base.version, **fed_options(c)) is None:
            raise SystemExit("federated mode made no model; see the log above")
        row = ev.measure("fedqmul", f"fedqmul {label(c)}")
        out["fedqmul"].append({**c, **row, "avg_gap": ev.gap(f"fedqmul {label(c)}")})
        print(f"tune {dest.name} fedqmul {label(c)}: Avg Gap (val) {out['fedqmul'][-1]['avg_gap']:.2f}", flush=True)
    for c in CENTRAL_GRID:
        pipeline.run_unlearn(s.run, method_config("qmul", c), quiet=True)
        row = ev.measure("qmul", f"qmul {label(c)}")
        out["qmul"].append({**c, **row, "avg_gap": ev.gap(f"qmul {label(c)}")})
        print(f"tune {dest.name} qmul {label(c)}: Avg Gap (val) {out['qmul'][-1]['avg_gap']:.2f}", flush=True)
    return out


def tune(base: Base, work: Path, reported: list[np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """``--tuning-sets`` tuning forget sets (each drawn like the reported one, disjoint from it and from each other);
    every grid point scored by its mean Avg Gap (val) over them; the best of each mode."""
    taken = [np.asarray(r) for r in reported]
    sets = []
    for i in range(args.tuning_sets):
        chosen = choose(base.trained, args.requests * args.samples, SEED + 1 + i, exclude=taken)
        taken = [np.concatenate([t, c]) for t, c in zip(taken, chosen, strict=True)]
        sets.append(tune_set(base, work / f"tune-{i + 1}", chosen, args))
    mean = {mode: [float(np.mean([t[mode][j]["avg_gap"] for t in sets])) for j in range(len(grid))]
            for mode, grid in (("fedqmul", FED_GRID), ("qmul", CENTRAL_GRID))}
    chosen_cfg = {mode: dict(grid[int(np.argmin(mean[mode]))])
                  for mode, grid in (("fedqmul", FED_GRID), ("qmul", CENTRAL_GRID))}
    return {"sets": sets, "mean_gap": mean, "best": chosen_cfg,
            "grids": {"fedqmul": FED_GRID, "qmul": CENTRAL_GRID}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-fed"), help="fleet, states and runs")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the trained fleet in WORK/base if it was made with the same setting")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per device")
    parser.add_argument("--samples", type=int, default=300, help="samples per request")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out test images per device")
    parser.add_argument("--tuning-sets", type=int, default=2, help="tuning forget sets (0: report the defaults only)")
    parser.add_argument("--tuning-only", action="store_true",
                        help="stop after the tuning; write OUT/federated_modes_tuning.json")
    parser.add_argument("--tuning", type=Path, help="take the tuning from this federated_modes_tuning.json")
    parser.add_argument("--note", default="", help="a paragraph for the report (how the run was made)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine busy with other work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    act_as_flower_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "edge_qmul.federated.receive", "edge_qmul.federated.coordinator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    prov = provenance_info()  # of the code as it starts
    words = list(argv if argv is not None else sys.argv[1:])
    if args.note:  # the note is printed in the report; the command names it only
        words = [w if w != args.note else "NOTE" for w in words]
    prov["command"] = " ".join(["python", "bench/federated_modes.py", *words])
    t0 = time.perf_counter()
    base = prepare(args.work / "base", args.clients, args.held_out, args.reuse)
    seconds: dict[str, float] = dict(base.seconds)
    reported = choose(base.trained, args.requests * args.samples, SEED)
    tuning: dict[str, Any] | None = None
    if args.tuning is not None:
        tuning = json.loads(args.tuning.read_text())
    elif args.tuning_sets > 0:
        t = time.perf_counter()
        tuning = {**tune(base, args.work, reported, args), "provenance": prov, "base_made": base.made}
        seconds["tuning"] = time.perf_counter() - t
        tuning["seconds"] = seconds["tuning"]
    if args.tuning_only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "federated_modes_tuning.json").write_text(json.dumps(tuning, indent=2, default=_jsonable) + "\n")
        print(json.dumps(tuning["best"] if tuning else None))
        return 0

    s = forget_set(base, args.work / "report", reported, args.requests, args.samples)
    seconds["intake"] = s.intake_seconds
    pipeline.run_unlearn(s.run, method_config("retrain"), quiet=True)
    ev = Evaluator(s.run, "test")
    ev.measure("retrain")
    central_rows = {"qmul": dict(CENTRAL_DEFAULT)}
    if tuning and tuning["best"]["qmul"] != CENTRAL_DEFAULT:
        central_rows["qmul tuned"] = tuning["best"]["qmul"]
    for name, c in central_rows.items():
        pipeline.run_unlearn(s.run, method_config("qmul", c), quiet=True)
        ev.measure("qmul", name)
    fed_rows = {"fedqmul before": dict(FED_BEFORE), "fedqmul": dict(FED_DEFAULT)}
    if tuning and tuning["best"]["fedqmul"] != FED_DEFAULT:
        fed_rows["fedqmul tuned"] = tuning["best"]["fedqmul"]
    fed_logs = {}
    for name, c in fed_rows.items():
        t = time.perf_counter()
        if run_fedqmul(s.grid, s.cfg, s.participants, model_version=base.version, **fed_options(c)) is None:
            print("federated mode made no model; see the log above", file=sys.stderr)
            return 1
        seconds[name] = time.perf_counter() - t
        ev.measure("fedqmul", name)
        fed_logs[name] = json.loads((s.run / "unlearn" / "fedqmul" / "log.json").read_text())["log"]
    table = ev.table()
    print(table)
    seconds["total"] = time.perf_counter() - t0
    write_results(args, prov, base, s, ev, table, tuning, central_rows, fed_rows, fed_logs, seconds)
    return 0


# What the reported rows run. CENTRAL_DEFAULT / FED_DEFAULT: the shipped defaults (QMul's and FedQMul's);
# FED_BEFORE: federated Q-MUL as it was before the tuning (one local epoch, the device's retain set every sample it
# contributed, the 10% the server kept for validation included).
CENTRAL_DEFAULT: dict[str, Any] = {"lr": QMul().lr, "epochs": QMul().epochs}
FED_DEFAULT: dict[str, Any] = {"lr": FEDERATED_RECIPE.get("lr", QMul().lr), "epochs": FEDERATED_RECIPE.get(
    "epochs", QMul().epochs), "local_epochs": LOCAL_EPOCHS}
FED_BEFORE: dict[str, Any] = {"lr": 0.3, "epochs": 5, "local_epochs": 1, "retain": "contributed"}


def write_results(args: argparse.Namespace, prov: dict[str, Any], base: Base, s: Session, ev: Evaluator, table: str,
                  tuning: dict[str, Any] | None, central_rows: dict[str, dict[str, Any]],
                  fed_rows: dict[str, dict[str, Any]], fed_logs: dict[str, Any], seconds: dict[str, float]) -> None:
    gaps = {name: ev.gap(name) for name in ev.rows}
    caches = {p.name: sum(f.stat().st_size for f in (p / "fedqmul").glob("*.npz"))
              for p in sorted((args.work / "report" / "states").iterdir())}
    result: dict[str, Any] = {
        "provenance": prov,
        "base_made": base.made,
        "clients": args.clients,
        "requests": s.intake.accepted,
        "forget_count": len(ev.forget_ids),
        "device_samples": [len(t_) for t_ in base.trained],
        "features_version": base.version,
        "seconds": seconds,
        "intake": {k: v for k, v in vars(s.intake).items() if k != "seconds"},
        "rows": ev.rows,
        "avg_gap": gaps,
        "configs": {**central_rows, **fed_rows},
        "tuning": tuning,
        "federated_logs": fed_logs,
        "device_feature_cache_bytes": caches,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federated_modes.json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    md = [f"# Central vs federated Q-MUL, Fashion-MNIST, {args.clients} devices, small CNN, int8 (x86)\n"]
    md.append(
        f"Each device is a `DeviceState` over its own `.npz` (an IID share of the Fashion-MNIST training file, "
        f"exact duplicates dropped; {args.held_out} test images as its held-out pool); the server trained the "
        "small CNN (default recipe) on the union with a provenance CSV by content id. The devices run the "
        f"quantized model ({base.version}), installed with its `features.onnx` in their state dirs. "
        f"{s.intake.accepted} device-filed requests ({len(ev.forget_ids)} samples) were recorded in one intake "
        "round through the in-process Grid (the real app code and Flower serialization; no SuperLink). "
        "Federated Q-MUL ran as the `FedQMul` strategy: each device resolved its request ids to its own samples "
        "and computed their features with `features.onnx` on its own pixels; only the classifier head's QAT "
        "state and statistics travelled. Central Q-MUL and retrain ran on the same ledger. Federated seconds: "
        "the devices ran one after another in one process.\n")
    md.append("Rows (configurations: lr, epochs = rounds for federated, local epochs per round):\n")
    for name, c in {**central_rows, **fed_rows}.items():
        md.append(f"- `{name}`: {label(c)}")
    md.append(f"\n```\n{table}\n```\n")
    md.append("Avg Gap to retrain (test split): " + ", ".join(f"{n} {g:.2f}" for n, g in gaps.items()) + ".\n")
    if args.note:
        md.append(args.note + "\n")
    if tuning is not None:
        md.append(tuning_md(tuning))
    for name, log_ in fed_logs.items():
        md.append(rounds_md(name, log_))
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    md.append(
        f"Provenance: commit {prov['commit'][:12]}{' (+ uncommitted changes)' if prov['dirty'] else ''}, "
        f"{versions}; Python {prov['python']}, {prov['machine']}; seed {SEED}; {prov['date']}. "
        f"Command: `{prov['command']}`. The trained fleet (data, device states, trained and quantized run) was made "
        f"by the same script at commit {str(base.made.get('commit', '?'))[:12]} on {base.made.get('date', '?')} "
        f"(`--reuse` takes it when the setting matches; {base_changes(base)}).\n")
    (args.out / "federated_modes.md").write_text("\n".join(md))


def base_changes(base: Base) -> str:
    """Whether the code that trains, quantizes and exports changed between the base's commit and this one."""
    made = str(base.made.get("commit", ""))
    if not made:
        return "its commit is unknown"
    out = subprocess.run(["git", "diff", "--name-only", made, "HEAD", "--", "edge_qmul", "export", "devices"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return "its commit is not in this repository"
    files = out.stdout.split()
    return (f"files of edge_qmul/, export/ and devices/ changed since: {', '.join(files)}" if files else
            "edge_qmul/, export/ and devices/ are unchanged since")


def tuning_md(t: dict[str, Any]) -> str:
    sets = t["sets"]
    prov = t.get("provenance", {})
    dirty = " + uncommitted changes" if prov.get("dirty") else ""
    where = (f" (run at commit {str(prov.get('commit', '?'))[:12]}{dirty}, {prov.get('date', '?')}: "
             f"`{prov.get('command', '?')}`)") if prov else ""
    lines = [
        f"Tuning (DESIGN.md §4.4){where}: {len(sets)} separate forget sets of the same shape (each "
        f"{sets[0]['forget_count']} samples in 18 other requests, drawn like the reported one, disjoint from it and "
        "from each other, on copies of the same trained run), each with its own retrain reference, and the "
        "validation split in place of the test split; the test split chose nothing. Each mode had "
        f"{len(t['grids']['fedqmul'])} configurations with the same learning rates and the same numbers of passes "
        "over the data (federated rounds x local epochs = central epochs); each mode's configuration with the "
        "smallest mean Avg Gap (val) over the tuning sets is its tuned one. Untouched Avg Gap (val): "
        + ", ".join(f"{x['none_gap']:.2f}" for x in sets) + ".\n",
        "| tuning set | row | FA | RA | VA | MIA |",
        "|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(sets):
        for name in ("none", "retrain"):
            r = x[name]
            lines.append(f"| {i + 1} | {name} | {r['FA']:.2f} | {r['RA']:.2f} | {r['TA']:.2f} | {r['MIA']:.2f} |")
    lines += ["", "| mode | lr | epochs | local epochs | " + " | ".join(
        f"set {i + 1}: FA / RA / VA / MIA | set {i + 1} Avg Gap" for i in range(len(sets))) + " | mean Avg Gap |",
        "|---|---|---|---|" + "---|---|" * len(sets) + "---|"]
    for mode in ("qmul", "fedqmul"):
        for j, c in enumerate(t["grids"][mode]):
            cells = []
            for x in sets:
                r = x[mode][j]
                cells += [f"{r['FA']:.2f} / {r['RA']:.2f} / {r['TA']:.2f} / {r['MIA']:.2f}", f"{r['avg_gap']:.2f}"]
            mark = " (chosen)" if dict(c) == t["best"][mode] else ""
            lines.append(f"| {mode} | {c['lr']} | {c['epochs']} | {c.get('local_epochs', '')} | " + " | ".join(cells)
                         + f" | {t['mean_gap'][mode][j]:.2f}{mark} |")
    return "\n".join(lines) + "\n"


def rounds_md(name: str, log_: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {r['epoch']} | {r['lr']:.4f} | {r['server_lr']:g} | {r['w_f']:.3f} | {r['w_r']:.3f} | "
        f"{r['forget_acc']:.2f} | {r['retain_acc']:.2f} |" for r in log_["rounds"])
    final = log_["final"]
    return (f"Federated rounds of `{name}` (statistics measured by the devices at the round's broadcast weights, on "
            "their own forget and retain sets; the last row is the devices' look after the final round):\n\n"
            "| round | lr | server lr | w_f | w_r | forget acc | retain acc |\n|---|---|---|---|---|---|---|\n"
            f"{rows}\n| final | | | | | {final['forget_acc']:.2f} | {final['retain_acc']:.2f} |\n")


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
