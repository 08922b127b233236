"""Fleet scale (issue 15, item 9): the production ServerApp and ClientApp on 10, 100 and 1,000 virtual devices under
Flower's simulation engine, and on real SuperNode processes over TLS with SuperNode authentication.

Every device has its own state directory (``DeviceState.init`` from its own Fashion-MNIST ``.npz``: 20 contributed
images, 5 held out); the server's run is a small CNN trained on the union with a provenance CSV naming each
device's trained hashes by its device id. Per fleet size, on a fresh copy of the run and the first N devices'
states (tests/fleet/simulation.py, ``run_protocol``):

1. every device files ``--per-device`` requests with ``DeviceState.forget`` (one of its trained samples each);
2. an ``intake`` run: ``query.forget`` -> the devices' signed queues -> ``receive()`` (ledger first) ->
   ``query.ack``; requests/s = accepted / (collect + acknowledge seconds of the server's round summary);
3. a ``central`` run: nothing new to collect; Q-MUL on the server; ``query.receipt`` to every device;
4. the result is validated (loose budgets: the protocol is measured, not the model) and signed, then a
   ``rollout`` run ships it in 3 waves (5% -> 25% -> 100%); seconds per wave from the rollout summary;
5. lost / duplicated: from the forget ledger against every device's own queue (each filed request acknowledged
   and honoured exactly once; ledger rows == distinct request ids == filed requests), and every device on the
   new model.

Seconds per round: each Flower message round of the app (forget+receive, ack, receipt, rollout status, each
wave). Under simulation the engine's start-up (Ray, its actors, the ClientApp import) is taken out by a
read-only warm-up query before the app starts and reported apart. The simulation engine's link state looks a
node's messages up by destination (tests/fleet/simulation.py ``indexed_link_state_class``; flwr 1.41's stock
in-memory state walks its whole message store for each of the N nodes it polls, O(N^2) per round, which
bench/fleet_profile.py measures); ``--stock-sizes`` runs fleets on the stock state as well, for comparison.
Server memory: peak RSS of the process running the ServerApp and the engine's link state (simulation: this child
process; loopback: the SuperLink and the ServerApp process it spawns), sampled every 0.25 s; the devices (Ray
workers / SuperNodes) are not counted.

Each fleet runs in its own child process (its own peak memory) and writes ``WORKDIR/result-*.json``; the parent
writes ``bench/results/fleet_scale.md`` and ``.json`` from whatever results exist (``--report-only`` rewrites
them from the saved results).

    python bench/fleet_scale.py                                   # 10, 100, 1000 simulated + 20 real (~1 h)
    python bench/fleet_scale.py --sizes 10 --loopback 0 --per-device 3
    python bench/fleet_scale.py --sizes 10,100,1000 --stock-sizes 1000 --loopback 0   # + 1,000 on the stock state
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test harnesses (they do not ship)

from fleet.simulation import (  # noqa: E402
    WAVES,
    Fleet,
    RssSampler,
    SimResult,
    build_fleet,
    descendants,
    fleet_copy,
    run_protocol,
    simulation_runner,
)

RESULTS = REPO / "bench" / "results"
PACKAGES = ("flwr", "ray", "torch", "onnxruntime", "numpy", "cryptography")


def _template(args: argparse.Namespace) -> Fleet:
    size = max([*args.sizes, *args.stock_sizes, args.loopback])
    made = [int(p.name.split("-")[1]) for p in args.workdir.glob("template-*") if (p / "fleet.json").exists()]
    size = min([k for k in made if k >= size], default=size)  # a larger template already made serves as well
    t = time.perf_counter()
    fleet = build_fleet(args.workdir / f"template-{size}", size, seed=args.seed)
    print(f"template: {size} devices ready in {time.perf_counter() - t:.0f}s ({fleet.seconds})", flush=True)
    return fleet


def child_simulation(args: argparse.Namespace, size: int, indexed: bool = True) -> dict[str, Any]:
    fleet = _template(args)
    copy = fleet_copy(fleet, args.workdir / f"sim-{size}-{int(time.time())}", size)
    out = run_protocol(copy, simulation_runner(copy, actors=args.actors, indexed=indexed), args.per_device,
                       log=lambda m: print(m, flush=True))
    return {"kind": "simulation", "link_state": "indexed" if indexed else "flower-stock", **out}


def child_loopback(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    """``nodes`` real flower-supernode processes (tests/fleet/loopback.Deployment: TLS, SuperNode auth), each
    with its own state dir (a device of the template), and the same protocol through `flwr run`."""
    from fleet.loopback import Deployment

    fleet = _template(args)
    copy = fleet_copy(fleet, args.workdir / f"loopback-{nodes}-{int(time.time())}", nodes)
    dep = Deployment(copy.root / "deploy", nodes, states=[copy.state_dir(i) for i in range(nodes)])
    node_peak: dict[str, float] = {"mb": 0.0}

    def runner(run_config: dict[str, Any]) -> SimResult:
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in {"run-dir": str(copy.run), "num-clients": nodes,
                                                           **run_config}.items())
        superlink = dep.procs["superlink"].pid
        nodes_pids = [p.pid for name, p in dep.procs.items() if name != "superlink"]
        t = time.perf_counter()
        with RssSampler(lambda: descendants(superlink)) as rss, \
                RssSampler(lambda: [q for p in nodes_pids for q in descendants(p)]) as devices:
            run_id = dep.run_app(text)
            status = dep.wait(run_id, timeout=3600)
        node_peak["mb"] = max(node_peak["mb"], devices.peak_mb)
        if status != "finished:completed":
            raise RuntimeError(f"flwr run {run_id} ({run_config.get('mode')}): {status}\n{dep.server_log(run_id)}")
        return SimResult(time.perf_counter() - t, 0.0, rss.peak_mb)

    # a SIGTERM (the parent stopped, or an operator) still stops the SuperLink and SuperNodes: they run in
    # sessions of their own and would outlive this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = time.perf_counter()
    try:
        dep.start()
        started = time.perf_counter() - t
        print(f"deployment: SuperLink + {nodes} SuperNodes (TLS, SuperNode auth) up in {started:.0f}s", flush=True)
        out = run_protocol(copy, runner, args.per_device, log=lambda m: print(m, flush=True))
    finally:
        dep.stop()
    return {"kind": "loopback", "start_seconds": started, "devices_peak_rss_mb": node_peak["mb"], **out}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _rounds(r: dict[str, Any]) -> dict[str, float]:
    """Seconds of each message round of the app in this fleet's three runs."""
    intake, central, rollout = r["intake"]["summary"]["seconds"], r["central"]["summary"]["seconds"], r["rollout"]
    out = {"forget+receive": intake["collect"], "ack": intake["ack"], "receipt": central["receipt"],
           "rollout status": rollout["status_seconds"] or 0.0,
           # the central run's acknowledgement has nothing to settle: the message round alone
           "empty round": central["ack"]}
    for w in rollout["waves"]:
        out[f"wave {w['wave']}"] = w["seconds"] or 0.0
    return out


def _per_device_round(r: dict[str, Any]) -> float:
    """Mean seconds per message round per device: the rounds that reach every device (forget+receive, ack,
    receipt, status), over the fleet size. Flat or falling with size = per-round time linear or better."""
    rounds = _rounds(r)
    keys = ("forget+receive", "ack", "receipt", "rollout status")
    return sum(rounds[k] for k in keys) / len(keys) / r["devices"]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    a = r["audit"]
    waves = r["rollout"]["waves"]
    rounds = _rounds(r)
    return {
        "fleet": f"{r['devices']:,} {_kind(r)}",
        "requests": r["filed"],
        "accepted": r["intake"]["summary"]["accepted"],
        "intake_s": r["intake"]["intake_seconds"],
        "req_per_s": r["intake"]["requests_per_second"],
        "rounds": rounds,
        "round_mean_s": sum(rounds[k] for k in ("forget+receive", "ack", "receipt", "rollout status")) / 4,
        "per_device_ms": 1000 * _per_device_round(r),
        "waves_s": [w["seconds"] for w in waves],
        "wave_devices": [w["devices"] for w in waves],
        "rollout_status": r["rollout"]["status"],
        "on_new_model": r["on_new_model"],
        "server_peak_mb": max(r["intake"]["peak_rss_mb"], r["central"]["peak_rss_mb"], r["rollout"]["peak_rss_mb"]),
        "intake_peak_mb": r["intake"]["peak_rss_mb"],
        "rollout_peak_mb": r["rollout"]["peak_rss_mb"],
        "lost": a["lost"],
        "duplicated": a["duplicated"],
        "ledger_rows": a["ledger_rows"],
        "distinct_ids": a["distinct_ids"],
        "acknowledged": a["acknowledged"],
        "honoured": a["statuses"].get("honoured", 0),
        "unlearn_s": r["central"]["summary"]["seconds"].get("unlearn", 0.0),
        "warmup_s": r["intake"].get("warmup_seconds", 0.0),
        "forget_levels": r["rollout"].get("forget_check_levels", {}),
        "bundle_bytes": r["bundle"]["bytes"],
    }


def _provenance(args: argparse.Namespace, command: str) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"commit": commit, "worktree_modified": bool(dirty), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "python": platform.python_version(), "packages": versions, "seed": args.seed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "command": command, "per_device": args.per_device, "waves": WAVES, "actors": args.actors}


def _commit_of(r: dict[str, Any]) -> str:
    """The commit a fleet's run started from, as the report shows it."""
    commit = str(r.get("commit", ""))
    if not commit:
        return "(not recorded)"
    shown = f"`{commit[:12]}`" + (" + uncommitted changes of other work" if commit.endswith("+modified") else "")
    return shown + (f" ({r['commit_note']})" if r.get("commit_note") else "")


def _kind(r: dict[str, Any]) -> str:
    """``virtual`` (the rows the growth figures compare), ``virtual, stock link state`` or ``real SuperNodes``."""
    if r["kind"] != "simulation":
        return "real SuperNodes"
    return "virtual, stock link state" if r.get("link_state") == "flower-stock" else "virtual"


def _size(row: dict[str, Any]) -> int:
    return int(row["fleet"].split()[0].replace(",", ""))


def _growth(rows: list[dict[str, Any]]) -> str:
    sims = [r for r in rows if r["fleet"].endswith("virtual")]
    if len(sims) < 2:
        return "one fleet size only: no growth figure"
    first, last = sims[0], sims[-1]
    grew = last["round_mean_s"] / first["round_mean_s"]
    ratio = grew / (_size(last) / _size(first))
    verdict = "no worse than linear" if ratio <= 1.0 else "WORSE than linear"
    return (f"mean per-round time x{grew:.1f} for x{_size(last) / _size(first):.0f} "
            f"devices ({_size(first)} -> {_size(last)}): {ratio:.2f} of linear growth, {verdict}")


def _growth_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per round: its time's growth between consecutive simulated sizes, as a share of linear growth in the devices
    it reaches (the fleet; a wave's own devices) (1.00 = linear; above 1 = worse than linear)."""
    sims = [r for r in rows if r["fleet"].endswith("virtual")]
    if len(sims) < 2:
        return []
    pairs = list(zip(sims, sims[1:], strict=False))
    head = "| round | " + " | ".join(f"{_size(a)} -> {_size(b)}" for a, b in pairs) + " |"
    out = [head, "|---|" + "---:|" * len(pairs)]
    names = [k for k in sims[0]["rounds"] if all(k in r["rounds"] for r in sims)]
    for name in [*names, "intake ms per request"]:
        cells = []
        for a, b in pairs:
            if name == "intake ms per request":  # per-request server cost: constant = linear round time
                x, y = 1000 / a["req_per_s"], 1000 / b["req_per_s"]
                cells.append(f"{x:.0f} -> {y:.0f} ms (x{y / x:.2f})")
                continue
            x, y = a["rounds"][name], b["rounds"][name]
            if name.startswith("wave "):  # a wave reaches its own share of the fleet: linear in its devices
                k = int(name.split()[1]) - 1
                scale = b["wave_devices"][k] / a["wave_devices"][k]
            else:
                scale = _size(b) / _size(a)
            share = (y / x) / scale if x > 0 else float("nan")
            cells.append(f"x{y / x:.1f} for x{scale:.1f} ({share:.2f} of linear)" if x > 0 else "-")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], command: str) -> None:
    rows = [_row(r) for r in results]
    prov = _provenance(args, command)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet_scale.json").write_text(json.dumps({"provenance": prov, "rows": rows, "raw": results},
                                                         indent=1, default=str) + "\n")
    f = lambda x: f"{x:,.1f}"  # noqa: E731
    dirty = " (+ uncommitted changes of other work in the tree)" if prov["worktree_modified"] else ""
    lines = [
        "# Fleet scale: intake, receipts and a 3-wave rollout on 10 to 1,000 devices",
        "",
        f"Commit `{prov['commit'][:12]}`{dirty}, "
        f"{prov['date']}, {prov['machine']}, Python {prov['python']}; "
        + ", ".join(f"{k} {v}" for k, v in prov["packages"].items()) + f". Seed {prov['seed']}.",
        "",
        "Each row was measured at the commit its run started from (HEAD can move while a long benchmark runs): "
        + "; ".join(f"{row['fleet']} {_commit_of(r)}" for row, r in zip(rows, results, strict=True)) + ".",
        "",
        f"Command: `{command}`",
        "",
        "The production ServerApp and ClientApp (edge_qmul.federated.server_app / client_app). Virtual devices: "
        f"Flower's simulation engine (Ray, {args.actors} actors on the machine's 2 cores, so device work is "
        "serialized). Real: "
        "flower-superlink with TLS and SuperNode authentication and one flower-supernode process per device "
        "(tests/fleet/loopback.Deployment). Every device has its own state dir made by `DeviceState.init` from its own "
        f".npz (20 contributed Fashion-MNIST images, 5 held out) and files {args.per_device} requests with "
        "`DeviceState.forget`, one trained sample each. Other benchmarks and test suites ran on the same machine "
        "throughout: absolute seconds are several times what an idle machine gives." + (f" {args.note}" if args.note
                                                                                         else ""),
        "",
        "| fleet | requests | intake s | requests/s | s/round (mean of 4 fleet-wide rounds) | ms/round per device "
        "| waves 5/25/100% (devices; s) | rollout | on new model | server peak RSS MiB | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        waves = " / ".join(f"{d}; {s:.1f}" for d, s in zip(r["wave_devices"], r["waves_s"], strict=True))
        lines.append(f"| {r['fleet']} | {r['requests']:,} | {f(r['intake_s'])} | {f(r['req_per_s'])} | "
                     f"{f(r['round_mean_s'])} | {r['per_device_ms']:.0f} | {waves} | {r['rollout_status']} | "
                     f"{r['on_new_model']:,} | {r['server_peak_mb']:,.0f} | {r['lost']} | {r['duplicated']} |")
    lines += ["", f"Growth: {_growth(rows)}.", "", "Growth of each round between fleet sizes:", "",
              *_growth_table(rows), "", "Each round (seconds):", "",
              "| fleet | " + " | ".join(rows[0]["rounds"]) + " |" if rows else "",
              "|---|" + "---:|" * len(rows[0]["rounds"]) if rows else ""]
    for r in rows:
        lines.append(f"| {r['fleet']} | " + " | ".join(f(v) for v in r["rounds"].values()) + " |")
    lines += ["", "Accounting (from the forget ledger and every device's own queue):", "",
              "| fleet | filed | acknowledged | honoured | ledger rows | distinct ids | lost | duplicated "
              "| forget checks | Q-MUL s | engine warm-up s | bundle bytes |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        levels = ", ".join(f"{v} {k}" for k, v in sorted(r["forget_levels"].items())) or "-"
        lines.append(f"| {r['fleet']} | {r['requests']:,} | {r['acknowledged']:,} | {r['honoured']:,} | "
                     f"{r['ledger_rows']:,} | {r['distinct_ids']:,} | {r['lost']} | {r['duplicated']} | {levels} | "
                     f"{f(r['unlearn_s'])} | {f(r['warmup_s'])} | {r['bundle_bytes']:,} |")
    lines += [
        "",
        "- intake s: collect (the forget query round, including the server's `receive()` of every entry: signature, "
        "ownership by provenance, ledger commit) + acknowledge; requests/s = accepted / intake s.",
        "- lost: a request a device filed that is not in the ledger, or that the device still holds unanswered; "
        "duplicated: ledger rows beyond one per request id, plus rows no device filed. Every request is also "
        "honoured (its receipt reached the device) and every device ends on the rolled-out model.",
        "- The rollout runs with `max-forget-auc=1`: each device still runs its on-board forget check on its own "
        "forgotten vs held-out samples and reports it (levels above), but with 10 forgotten and 5 held-out samples "
        "the AUC is mostly sampling noise, and a protocol load test must not stop on it.",
        "- `empty round`: the central run's acknowledgement round, where no device has anything to settle: the "
        "message round trip alone.",
        "- Resolution: under the simulation engine a round lasts a whole number of ~0.1 s ticks (the engine "
        "dispatches and Flower's grid collects replies every 0.1 s), so the 100-device fleet-wide rounds (0.3-0.5 s) "
        "are 3-5 ticks and a growth ratio from them carries about one tick (20-30%) of uncertainty; "
        "bench/results/fleet_profile.md repeats the status and empty rounds at 100 and 1,000 devices.",
        "- Link state: the simulation engine polls every virtual node every 0.1 s for its next message "
        "(`vce_api.add_messages_to_queue`), and flwr 1.41's in-memory link state answers each poll by checking "
        "every stored message (`InMemoryLinkState.get_message_ins`), under the lock the reply thread needs: O(N^2) "
        "per round of N nodes, not ours (bench/results/fleet_profile.md has the profile). The `virtual` rows run "
        "the engine with that lookup indexed by destination node, as Flower's SQL link state (a real SuperLink's) "
        "does it (tests/fleet/simulation.py `indexed_link_state_class`; every other part of the engine is "
        "Flower's); `virtual, stock link state` rows run Flower's state unchanged. Our apps and the device code are "
        "the same in both.",
        "- The bundle is validated and signed for a `virtual-device` profile (tests/fleet/simulation.py: one "
        "thread, a 1 s latency budget): devices sharing two loaded cores miss the x86 reference profile's 5 ms p95.",
        "- Server peak RSS: the process holding the ServerApp and the link state (simulation: the benchmark's child "
        "process, which also ran Q-MUL in the central run; loopback: the SuperLink and its ServerApp process).",
    ]
    (RESULTS / "fleet_scale.md").write_text("\n".join(line for line in lines) + "\n")
    print((RESULTS / "fleet_scale.md").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="simulated fleet sizes")
    parser.add_argument("--stock-sizes", default="", help="simulated fleet sizes to run on flwr's stock in-memory "
                        "link state as well (O(N^2) per round; for comparison)")
    parser.add_argument("--loopback", type=int, default=20, help="real SuperNodes (0: none)")
    parser.add_argument("--per-device", type=int, default=10, help="requests each device files")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors running the virtual devices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edge-qmul-fleet-scale"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from WORKDIR's results")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. how the rows were run)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # sim:N or loopback:N
    parser.add_argument("--command", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s]
    args.stock_sizes = [int(s) for s in str(args.stock_sizes).split(",") if s]
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = args.command or "python bench/fleet_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.environ.setdefault("EDGE_QMUL_QUIET", "1")

    if args.child:
        kind, n = args.child.split(":")
        commit = _provenance(args, command)  # the code this child runs, taken before it starts
        result = (child_loopback(args, int(n)) if kind == "loopback"
                  else child_simulation(args, int(n), indexed=kind == "sim"))
        result["commit"] = commit["commit"] + ("+modified" if commit["worktree_modified"] else "")
        (args.workdir / f"result-{kind}-{n}.json").write_text(json.dumps(result, indent=1, default=str))
        return 0
    jobs = ([f"sim:{n}" for n in args.sizes] + [f"simstock:{n}" for n in args.stock_sizes]
            + ([f"loopback:{args.loopback}"] if args.loopback else []))
    if not args.report_only:
        _template(args)
        for job in jobs:
            t = time.perf_counter()
            print(f"=== {job}", flush=True)
            forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
            rc = subprocess.run([sys.executable, __file__, *forwarded, "--child", job, "--command", command]).returncode
            print(f"=== {job}: exit {rc} after {time.perf_counter() - t:.0f}s", flush=True)
    results = []
    for job in jobs:
        kind, n = job.split(":")
        path = args.workdir / f"result-{kind}-{n}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        print("no fleet finished: nothing to report", file=sys.stderr)
        return 1
    write_report(args, results, command)
    return 0 if len(results) == len(jobs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
