"""Central versus federated Q-MUL on the same device-filed requests (Fashion-MNIST, small CNN, int8).

1. Reuse the trained + quantized model of bench/qmul_vs_retrain.py (``--model-run``; trained if absent).
2. ``--clients`` devices (IID partitions of the training set) each file ``--requests`` signed requests of
   ``--samples`` samples; one forget round runs the real ServerApp / ClientApp code through the in-process
   Grid (Flower's serialization, no SuperLink) in federated mode: intake, then federated Q-MUL rounds.
3. On the same ledger: central Q-MUL (the server's copy of the data) and retrain (the reference).
4. Print and write the table (FA, RA, TA, MIA, Avg Gap to retrain, seconds) and the federated round log.

    python bench/federated_modes.py          # ~6 min on 2 cores; writes bench/results/federated_modes.*

The devices run one after another in this process, so the federated wall time is the sum of every
device's work plus the server's, not what a fleet running in parallel would see.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import run_round

from edge_qmul import pipeline
from edge_qmul.config import DataConfig, QuantConfig, method_config
from edge_qmul.demo import format_table
from edge_qmul.train import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (they do not ship)
from fleet.inprocess import NODE, act_as_flower_process, local_grid  # noqa: E402

SHARED = ("split.json", "run.json", "float.pt", "quantized.pt", "features.pt", "digests.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-run", type=Path, default=Path("runs/bench-fmnist"))
    parser.add_argument("--run", type=Path, default=Path("runs/bench-fed"))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--requests", type=int, default=6, help="requests per device")
    parser.add_argument("--samples", type=int, default=300, help="samples per request")
    parser.add_argument("--server-lr", type=float, default=1.0, help="server step towards the average (1 = FedAvg)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    act_as_flower_process()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if not (args.model_run / "quantized.pt").exists():
        pipeline.train(args.model_run, DataConfig(dataset="fashion-mnist"), TrainConfig(), quiet=True)
        pipeline.quantize(args.model_run, QuantConfig(), quiet=True)
    if args.run.exists():
        shutil.rmtree(args.run)
    args.run.mkdir(parents=True)
    for name in SHARED:
        shutil.copy2(args.model_run / name, args.run / name)

    with tempfile.TemporaryDirectory(prefix="edge-qmul-devices-") as devices:
        config: dict[str, object] = {
            "mode": "federated", "requests-per-client": args.requests, "samples-per-request": args.samples,
            "server-lr": args.server_lr, "reply-timeout": 600.0,
        }
        grid = local_grid(args.run.resolve(), Path(devices), config, n=args.clients)
        t0 = time.perf_counter()
        summary = run_round(grid, FederatedConfig.from_run_config(grid.contexts[NODE].run_config))
        round_seconds = time.perf_counter() - t0
    if summary.model_version is None:
        print("federated mode made no model; see the log above", file=sys.stderr)
        return 1
    pipeline.run_unlearn(args.run, method_config("qmul"), quiet=True)
    pipeline.run_unlearn(args.run, method_config("retrain"), quiet=True)
    report = pipeline.evaluate(args.run, ["retrain", "qmul", "fedqmul"])
    table = format_table(report)
    fed_log = json.loads((args.run / "unlearn" / "fedqmul" / "log.json").read_text())["log"]
    print(table)
    rows = report.methods
    print(f"Avg Gap to retrain: central qmul {rows['qmul']['avg_gap']:.2f}, federated {rows['fedqmul']['avg_gap']:.2f}")

    result: dict[str, Any] = {
        "clients": args.clients,
        "requests": summary.accepted,
        "forget_count": report.forget_count,
        "round": {"seconds": round_seconds, **{k: v for k, v in vars(summary).items() if k != "seconds"},
                  "phase_seconds": summary.seconds},
        "report": report,
        "federated_rounds": fed_log["rounds"],
        "qmul_config": fed_log["config"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federated_modes.json").write_text(json.dumps(result, indent=2) + "\n")
    rounds_md = "\n".join(
        f"| {r['epoch']} | {r['lr']:.4f} | {r['server_lr']:.0f} | {r['w_f']:.3f} | {r['w_r']:.3f} | "
        f"{r['forget_acc']:.2f} | {r['retain_acc']:.2f} |"
        for r in fed_log["rounds"]
    )
    (args.out / "federated_modes.md").write_text(
        f"# Central vs federated Q-MUL, Fashion-MNIST, {args.clients} devices, small CNN, int8 (x86)\n\n"
        f"{summary.accepted} device-filed requests ({report.forget_count} samples) collected in one forget "
        f"round through the in-process Grid (the real app code and Flower serialization; no SuperLink).\n"
        "Central Q-MUL and retrain ran on the same ledger. Federated seconds: the devices ran one after "
        "another in one process.\n\n"
        f"```\n{table}\n```\n\n"
        "Federated rounds (statistics measured by the devices at the round's broadcast weights):\n\n"
        "| round | lr | server lr | w_f | w_r | forget acc | retain acc |\n|---|---|---|---|---|---|---|\n"
        f"{rounds_md}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
