"""Intake load check through a real SuperLink with three SuperNodes on loopback (TLS, SuperNode authentication).

Three devices, each set up with `edge-qmul device init` from its own .npz of digits (tests/fleet/devices.py;
the server's run trained with `--provenance`), each queue ``--requests`` signed requests of ``--samples`` of
their own trained samples. The app runs in intake mode (collect, verify, record, acknowledge; no
unlearning), ``--rounds`` times: the first run carries the whole load, later runs check that nothing is filed
twice. Afterwards:

- lost: acknowledged on a device but not in the ledger, still unanswered on a device, or filed and missing;
- duplicated: ledger rows with a repeated request id or sample set;

both must be zero. Throughput = accepted requests / (collect + acknowledge seconds of the round, from the
server's round summary); the end-to-end figure includes `flwr run` start-up and the ~6 s message round trips.

    python bench/intake_load.py                       # 3 x 200 requests of 2 samples
    python bench/intake_load.py --requests 50
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

from edge_qmul.devices.state import DeviceState

from edge_qmul.ledger import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harnesses (they do not ship)
from fleet.devices import make_fleet  # noqa: E402
from fleet.loopback import Deployment  # noqa: E402

NODES = 3
TRAIN, HELD_OUT = 520, 50  # per device: 3 x 570 of the 1,797 digits (50 left for the server's test set)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per device")
    parser.add_argument("--samples", type=int, default=2, help="samples per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edge-qmul-load-") as tmp:
        root = Path(tmp)
        fleet = make_fleet(root / "fleet", NODES, train=TRAIN, held_out=HELD_OUT, epochs=1, quantize=False)
        run = fleet.run
        for i, state in enumerate(fleet.states):
            mine = fleet.trained[i]
            if args.requests * args.samples > len(mine):
                print(f"device {i} contributed {len(mine)} trained samples: fewer than --requests x --samples",
                      file=sys.stderr)
                return 2
            with DeviceState.open(state) as d:
                for j in range(args.requests):
                    d.forget(hashes=mine[j * args.samples:(j + 1) * args.samples])
        dep = Deployment(root / "deploy", NODES, states=fleet.states)
        rounds: list[dict[str, Any]] = []
        try:
            dep.start()
            for _ in range(args.rounds):
                t0 = time.monotonic()
                run_id = dep.run_app(f'run-dir="{run}" mode="intake" reply-timeout=300.0')
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
            statuses = [dep.statuses(i) for i in range(NODES)]
            acked = {rid for st in statuses for rid, s in st.items() if s == "acknowledged"}
            pending = sum(s in ("pending", "sent") for st in statuses for s in st.values())
        finally:
            dep.stop()
        with Ledger(run / "ledger.sqlite") as ledger:
            rows = ledger.requests()

    filed = NODES * args.requests
    ids = Counter(r.request_id for r in rows)
    sample_sets = Counter(tuple(r.sample_ids) for r in rows)
    lost = len(acked - set(ids)) + pending + (filed - len(ids))
    duplicated = sum(c - 1 for c in ids.values()) + sum(c - 1 for c in sample_sets.values())
    accepted = sum(r["accepted"] for r in rounds)
    duplicated += max(0, accepted - len(ids))  # a request accepted (recorded) twice
    result = {"dataset": "digits (per-device npz)", "nodes": NODES, "filed": filed, "samples_per_request": args.samples,
              "ledger_rows": len(rows), "acked_on_devices": len(acked), "pending_on_devices": pending,
              "lost": lost, "duplicated": duplicated, "rounds": rounds}
    result["provenance"] = provenance(argv)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intake_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = "\n".join(
        f"| {r['run_id']} | {r['accepted']} | {r['already_recorded']} | {r['intake_seconds']:.1f} | "
        f"{r['requests_per_second']:.0f} | {r['wall_seconds']:.1f} |" for r in rounds
    )
    (args.out / "intake_load.md").write_text(
        f"# Intake load: real SuperLink + {NODES} SuperNodes on loopback, TLS + SuperNode auth (digits)\n\n"
        f"{filed} signed requests ({args.requests} per device, {args.samples} samples each), intake mode.\n\n"
        "| run | accepted | already recorded | intake s | req/s | wall s |\n|---|---|---|---|---|---|\n"
        f"{lines}\n\nLedger rows {len(rows)}, acknowledged on devices {len(acked)}, pending {pending}: "
        f"**lost {lost}, duplicated {duplicated}**.\n\n{provenance_line(result['provenance'])}\n"
    )
    return 0 if lost == 0 and duplicated == 0 else 1


def provenance(argv: list[str] | None) -> dict[str, object]:
    """Commit (and whether the tree had changes), package versions, seed, date and command of this run."""
    import datetime
    import platform
    import subprocess
    from importlib.metadata import version

    here = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "edge_qmul", "export", "federated", "devices",
                            "bench/intake_load.py"], capture_output=True, text=True, cwd=here.parent).stdout.strip()
    return {"commit": commit, "uncommitted_changes": bool(dirty),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": {p: version(p) for p in ("flwr", "onnxruntime", "torch", "numpy", "cryptography")},
            "python": platform.python_version(), "seed": 0,
            "command": "python bench/intake_load.py " + " ".join(argv if argv is not None else sys.argv[1:])}


def provenance_line(prov: dict[str, object]) -> str:
    return (f"Commit {str(prov['commit'])[:12]}{' (+ uncommitted changes)' if prov['uncommitted_changes'] else ''}, "
            f"{prov['date']}; {prov['versions']}; seed {prov['seed']}; command `{prov['command']}`.")


if __name__ == "__main__":
    sys.exit(main())
