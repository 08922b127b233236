"""Intake load check through a real SuperLink with three SuperNodes on loopback (TLS, SuperNode authentication).

Each device files ``--requests`` signed requests (``--samples`` samples each, its own samples) and the
app runs in intake mode (collect, verify, record, acknowledge; no unlearning), ``--rounds`` times:
the first run carries the whole load, later runs check that nothing is filed twice. Afterwards:

- lost: acknowledged by the server (device queue) but not in the ledger, or still pending on a device;
- duplicated: ledger rows with a repeated request id or sample set, or a request accepted twice in the
  intake log;

both must be zero. Throughput = accepted requests / (collect + acknowledge seconds of the round, from
the server's round summary); the end-to-end figure includes `flwr run` start-up and the ~6 s message
round trips.

    python bench/intake_load.py                       # Fashion-MNIST split, 3 x 2000 requests
    python bench/intake_load.py --dataset digits --requests 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from edge_qmul.federated.store import FleetStore

from edge_qmul import data
from edge_qmul.ledger import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (they do not ship)
from fleet.loopback import Deployment  # noqa: E402

NODES = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--requests", type=int, default=2000, help="requests per device")
    parser.add_argument("--samples", type=int, default=2, help="samples per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edge-qmul-load-") as tmp:
        root = Path(tmp)
        run = root / "run"
        run.mkdir()
        data.make_split(data.load_dataset(args.dataset), seed=0).save(run / "split.json")  # intake needs only this
        dep = Deployment(root / "deploy", NODES)
        rounds: list[dict[str, Any]] = []
        try:
            dep.start()
            for _ in range(args.rounds):
                t0 = time.monotonic()
                run_id = dep.run_app(
                    f'run-dir="{run}" mode="intake" requests-per-client={args.requests} '
                    f'samples-per-request={args.samples} reply-timeout=300.0'
                )
                status = dep.wait(run_id)
                wall = time.monotonic() - t0
                if status != "finished:completed":
                    print(f"run {run_id}: {status}\n{dep.server_log(run_id)}", file=sys.stderr)
                    return 1
                summary = json.loads((run / "federated" / f"round-{run_id}.json").read_text())
                busy = summary["seconds"]["collect"] + summary["seconds"]["ack"]
                rounds.append({"run_id": run_id, "wall_seconds": wall, "intake_seconds": busy,
                               "accepted": summary["accepted"], "already_recorded": summary["already_recorded"],
                               "refused": summary["refused"],
                               "requests_per_second": summary["accepted"] / busy if busy else 0.0})
                print(f"run {run_id}: {summary['accepted']} accepted, {summary['refused']} refused; "
                      f"intake {busy:.1f}s ({rounds[-1]['requests_per_second']:.0f} req/s), wall {wall:.1f}s")
            acked = {rid for i in range(NODES) for rid in dep.device_state(i).get("acked", {})}
            pending = sum(len(dep.device_state(i).get("pending", [])) for i in range(NODES))
        finally:
            dep.stop()
        with Ledger(run / "ledger.sqlite") as ledger:
            rows = ledger.requests()
        with FleetStore(run / "ledger.sqlite") as store:
            accepted_log = Counter(r.request_id for r in store.intake_log() if r.outcome == "accepted")

    filed = NODES * args.requests
    ids = Counter(r.request_id for r in rows)
    sample_sets = Counter(tuple(r.sample_ids) for r in rows)
    lost = len(acked - set(ids)) + pending + (filed - len(ids))
    duplicated = (sum(c - 1 for c in ids.values()) + sum(c - 1 for c in sample_sets.values())
                  + sum(c - 1 for c in accepted_log.values()))
    result = {"dataset": args.dataset, "nodes": NODES, "filed": filed, "samples_per_request": args.samples,
              "ledger_rows": len(rows), "acked_on_devices": len(acked), "pending_on_devices": pending,
              "lost": lost, "duplicated": duplicated, "rounds": rounds}
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intake_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = "\n".join(
        f"| {r['run_id']} | {r['accepted']} | {r['already_recorded']} | {r['intake_seconds']:.1f} | "
        f"{r['requests_per_second']:.0f} | {r['wall_seconds']:.1f} |" for r in rounds
    )
    (args.out / "intake_load.md").write_text(
        f"# Intake load: real SuperLink + {NODES} SuperNodes on loopback, TLS + SuperNode auth ({args.dataset})\n\n"
        f"{filed} signed requests ({args.requests} per device, {args.samples} samples each), intake mode.\n\n"
        "| run | accepted | already recorded | intake s | req/s | wall s |\n|---|---|---|---|---|---|\n"
        f"{lines}\n\nLedger rows {len(rows)}, acknowledged on devices {len(acked)}, pending {pending}: "
        f"**lost {lost}, duplicated {duplicated}**.\n"
    )
    return 0 if lost == 0 and duplicated == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
