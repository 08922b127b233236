"""``edge-qmul`` command line: a thin layer over edge_qmul.pipeline.

Heavy imports (torch, sklearn) happen inside the commands so ``edge-qmul --help`` is instant. Options
come from a TOML file (``--config``) and flags; flags win. Errors print one message with the fix and
exit with the code of their area (see ``edge_qmul.errors.EXIT_CODES``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_qmul.errors import EXIT_CODES, BundleError, ConfigError, EdgeQmulError, ValidationFailed


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--ids must be integers separated by commas, got {text!r}") from err


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (default), fashion-mnist, mnist, cifar10, cifar100, synthetic")
    g.add_argument("--data-root", dest="root", help="dataset directory (fashion-mnist defaults to the Debian package)")
    g.add_argument("--seed", type=int, help="seed for the split, training and forget selection (default 0)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training recipe")
    g.add_argument("--model", help="small_cnn (default), resnet8, resnet20, resnet18")
    g.add_argument("--width", type=int, help="channel width (0 = the model's default)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--lr", type=float, help="training learning rate")
    g.add_argument("--batch-size", type=int, help="training batch size")
    g.add_argument("--generations", type=int, help="train in N data generations with checkpoints (for exact "
                   "replay by `unlearn --method auto`; default 1)")


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--backend", help="x86 (default) or qnnpack (ARM)")
    g.add_argument("--calibration-size", type=int, help="calibration samples (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {c}  {h}" for c, h in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="edge-qmul",
        description="Unlearning for int8 models on edge devices: quantize, forget, unlearn, evaluate.",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help_: str, needs_run: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--run", type=Path, required=needs_run, help="run directory")
        p.add_argument("--config", type=Path, help="TOML file with [data] [train] [quant] [unlearn] tables")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    p = cmd("demo", "the whole slice on one dataset: train, quantize, forget, unlearn with every method, evaluate",
            needs_run=False)
    _add_data_flags(p)
    _add_train_flags(p)
    _add_quant_flags(p)
    p.add_argument("--forget-fraction", type=float, default=0.1, help="fraction of training samples to forget")
    p.add_argument("--methods", help="comma-separated methods (default: retrain,qmul,finetune,random_label,"
                   "grad_ascent,famr)")

    p = cmd("train", "split the dataset and train the float model")
    _add_data_flags(p)
    _add_train_flags(p)

    p = cmd("quantize", "PTQ to the deployed int8 model and build its QAT copy")
    _add_quant_flags(p)
    p.add_argument("--device", help="device profile (rpi4, rpi5, jetson-orin-nano, imx8mp, rk3588, x86-server) "
                   "or a profile TOML; picks the quantization engine")

    p = cmd("forget", "file a deletion request in the run's ledger")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--ids", type=_ids, help="training-sample ids, e.g. 3,17,42")
    sel.add_argument("--class", dest="klass", type=int, help="forget every training sample of this class")
    sel.add_argument("--count", type=int, help="forget this many random training samples")
    sel.add_argument("--fraction", type=float, help="forget this fraction of the training samples")
    p.add_argument("--request-id", help="request id (default: derived from the selection; re-filing is a no-op)")
    p.add_argument("--seed", type=int, default=0, help="seed for --count / --fraction")

    p = cmd("unlearn", "unlearn every request in the ledger with one method")
    p.add_argument("--method", required=True, help="qmul, retrain, finetune, random_label, grad_ascent, famr, "
                   "or auto (exact replay when cheaper, else qmul)")
    g = p.add_argument_group("unlearning (override the method's defaults)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--update", choices=["sequential", "mixed"])
    g.add_argument("--label-variant", choices=["faithful", "paper_code"])
    g.add_argument("--retain-batches", type=int, help="random retain batches per epoch (0 = all)")
    g.add_argument("--retain-ratio", type=float,
                   help="random retain samples per epoch = this x the forget set (0 = all): cost follows the request")
    g.add_argument("--repair-batches", type=int, help="retain-only repair batches after unlearning")
    g.add_argument("--layers", choices=["all", "classifier"], help="which parameters move")
    g.add_argument("--norm-batches", type=int, help="batches per side for the gradient-norm estimate (0 = all)")

    p = cmd("evaluate", "metrics of the deployed model and every unlearning result; writes report.json")
    p.add_argument("--methods", help="comma-separated subset (default: all results in the run)")

    p = cmd("export", "write model.int8.onnx (unlearned) and model.fp32.onnx; checks the int8 kernels fuse")
    p.add_argument("--method", help="which unlearning result (default: the latest; in a demo run, qmul)")

    p = cmd("validate", "check the exported int8 model in onnxruntime against budgets; writes validation.json/.md")
    p.add_argument("--device", required=True, help="device profile name or TOML file")
    p.add_argument("--budgets", type=Path, help="TOML overriding the default budgets")
    p.add_argument("--method", help="unlearning result the ONNX came from (default: from its metadata)")

    p = cmd("audit", "reference-model membership audit (LiRA-style, offline) of the original and unlearned models")
    p.add_argument("--references", type=int, default=4, help="reference models trained on random halves (default 4)")
    p.add_argument("--methods", help="unlearning results to audit (default: all in the run)")
    p.add_argument("--max-test", type=int, default=2000, help="test samples used as non-members (default 2000)")

    p = cmd("keygen", "make an Ed25519 signing key (bundles, certificates) and its public key", needs_run=False)
    p.add_argument("--out", type=Path, required=True, help="directory for signing_key.pem and public_key.hex")

    p = cmd("bundle", "sign the validated int8 model into a bundle for one device profile")
    p.add_argument("--device", required=True, help="device profile the model was validated for")
    p.add_argument("--key", type=Path, required=True, help="signing_key.pem from `edge-qmul keygen`")
    p.add_argument("--out", type=Path, help="bundle path (default: RUN/bundles/VERSION-DEVICE.tar)")
    p.add_argument("--parent", help="model version this one replaces on the fleet (default: the last completed "
                   "rollout's, from rollout.sqlite)")

    p = cmd("certify", "issue signed deletion certificates for the validated model, then purge the samples")
    p.add_argument("--key", type=Path, required=True, help="signing_key.pem from `edge-qmul keygen`")
    p.add_argument("--no-purge", action="store_true", help="only issue certificates; keep the raw samples")

    p = cmd("rollout", "roll a signed bundle out to the fleet in waves, over a running Flower SuperLink")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle from `edge-qmul bundle`")
    p.add_argument("--superlink", default="local", help="connection name in $FLWR_HOME/config.toml (default local)")
    p.add_argument("--app", type=Path, default=Path("."), help="the edge-qmul checkout with the Flower app's "
                   "pyproject.toml (default: the current directory)")
    p.add_argument("--waves", default="5,25,100", help="cumulative percentages of the fleet (default 5,25,100)")
    p.add_argument("--pass-rate", type=float, default=1.0, help="share of a wave that must pass (default 1.0)")
    p.add_argument("--max-forget-auc", type=float, default=0.75, help="on-board forget check limit (default 0.75)")
    p.add_argument("--num-clients", type=int, default=3, help="fleet size (default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the rollout (default 1800)")
    p.add_argument("--flwr", default="flwr", help="the Flower CLI executable (default: flwr on PATH)")

    p = cmd("status", "the run's ledger, models, bundles, rollouts and certificates at a glance")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _overrides(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in keys}


def _methods(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def run_command(args: argparse.Namespace) -> int:
    from edge_qmul import config, pipeline

    toml = config.load_toml(args.config)
    data_keys = ("dataset", "root", "seed")
    train_keys = ("model", "width", "epochs", "lr", "batch_size", "generations")
    quant_keys = ("backend", "calibration_size")
    train_overrides = {**_overrides(args, train_keys), "seed": getattr(args, "seed", None)}

    if args.command == "demo":
        run_dir = args.run or pipeline.new_run_dir()
        methods = _methods(args.methods)
        unlearn_toml = dict(toml.get("unlearn", {}))  # a demo's [unlearn] table configures qmul
        if unlearn_toml.pop("method", "qmul") != "qmul":
            raise ConfigError("a demo's [unlearn] table configures qmul", 'leave out method = ... or set it to "qmul"')
        report = pipeline.demo(
            run_dir,
            config.resolve("data", toml, _overrides(args, data_keys)),
            config.resolve("train", toml, train_overrides),
            config.resolve("quant", toml, _overrides(args, quant_keys)),
            forget_fraction=args.forget_fraction,
            methods=tuple(methods) if methods else pipeline.DEMO_METHODS,
            unlearn_overrides=unlearn_toml,
            quiet=args.quiet,
        )
        print(f"report: {run_dir / 'report.json'}")
        return 0 if report else 1
    if args.command == "train":
        log = pipeline.train(
            args.run,
            config.resolve("data", toml, _overrides(args, data_keys)),
            config.resolve("train", toml, train_overrides),
            quiet=args.quiet,
        )
        print(f"trained: final train acc {log['epochs'][-1]['train_acc']:.2f}% ({log['seconds']:.1f}s) -> {args.run}")
        return 0
    if args.command == "quantize":
        quant_overrides = _overrides(args, quant_keys)
        if args.device:
            from edge_qmul.devices.profiles import load_profile

            engine = load_profile(args.device).quant_engine
            if args.backend and args.backend != engine:
                raise ConfigError(
                    f"--backend {args.backend} contradicts --device {args.device} (engine {engine})",
                    "pass only one of them",
                )
            quant_overrides["backend"] = engine
        info = pipeline.quantize(args.run, config.resolve("quant", toml, quant_overrides))
        print(json.dumps(info, indent=2))
        return 0
    if args.command == "forget":
        if args.seed is None:
            raise ConfigError("--seed needs a value", "pass --seed N")
        out = pipeline.forget(
            args.run, ids=args.ids, klass=args.klass, count=args.count, fraction=args.fraction,
            request_id=args.request_id, seed=args.seed,
        )
        state = "recorded" if out["added"] else "already recorded (no change)"
        print(f"request {out['request_id']}: {out['samples']} samples {state}; {out['forget_total']} to forget in all")
        return 0
    if args.command == "unlearn":
        keys = ("epochs", "lr", "batch_size", "update", "label_variant", "retain_batches", "retain_ratio",
                "repair_batches", "layers", "norm_batches")
        # the method's class (--method wins over the table's method key) takes the table and the flags given
        cfg = config.resolve("unlearn", toml, {**_overrides(args, keys), "method": args.method})
        meta = pipeline.run_unlearn(args.run, cfg, quiet=args.quiet)
        print(f"{args.method}: unlearned {meta['forget_count']} samples in {meta['seconds']:.1f}s "
              f"-> {args.run / 'unlearn' / args.method}")
        return 0
    if args.command == "evaluate":
        report = pipeline.evaluate(args.run, _methods(args.methods))
        print(pipeline.format_table(report))
        return 0
    if args.command == "export":
        from edge_qmul.export.stage import export_run

        res = export_run(args.run, args.method)
        print(f"wrote {res.int8_path} and {res.fp32_path}")
        print(f"optimised int8 graph: {res.int8_kernels} int8 kernels; ops {json.dumps(res.op_counts, sort_keys=True)}")
        return 0
    if args.command == "validate":
        from edge_qmul.devices.profiles import load_profile
        from edge_qmul.export.budgets import load_budgets
        from edge_qmul.export.validate import check_mark, check_value_text, validate_run

        v = validate_run(args.run, load_profile(args.device), load_budgets(args.budgets), method=args.method)
        for name, c in v.checks.items():
            print(f"{check_mark(c)} {name:<20} {check_value_text(c):>22}  limit {c['limit']:.4g}")
            if "inconclusive" in c:
                print(f"  inconclusive: {c['inconclusive']}")
        print(f"report: {args.run / 'validation.md'}")
        if not v.passed:
            failed = [n for n, c in v.checks.items() if not c["passed"]]
            raise ValidationFailed(f"checks over budget: {', '.join(failed)}", "see validation.md")
        return 0
    if args.command == "audit":
        from edge_qmul.audit import audit_run

        methods = _methods(args.methods)
        if methods is None:
            methods = sorted(p.name for p in (args.run / "unlearn").glob("*") if (p / "result.pt").exists())
        report = audit_run(args.run, methods, k=args.references, max_test=args.max_test, quiet=args.quiet)
        print(f"{'target':<14}{'AUC':>8}{'TPR@1%':>9}{'TPR@0.1%':>10}  ({report['references']} references, "
              f"{report['forget']} forget vs {report['test']} test samples)")
        for r in report["targets"]:
            print(f"{r['target']:<14}{r['auc']:8.3f}{r['tpr_at_1fpr']:9.3f}{r['tpr_at_01fpr']:10.3f}")
        return 0
    if args.command == "keygen":
        from edge_qmul.export.bundle import keygen

        key_path, pub_path = keygen(args.out)
        print(f"signing key {key_path} (keep it secret); public key {pub_path}: {pub_path.read_text().strip()}")
        return 0
    if args.command == "bundle":
        from edge_qmul.devices.profiles import load_profile
        from edge_qmul.export.bundle import build_bundle, read_manifest

        path = build_bundle(args.run, load_profile(args.device), args.key, out=args.out, parent=args.parent)
        manifest = read_manifest(path)
        print(f"bundle {path}: model {manifest['model_version']} for {manifest['device']}, "
              f"{len(manifest['files'])} files, honours {len(manifest['honoured_request_ids'])} request(s)")
        return 0
    if args.command == "certify":
        from edge_qmul.export.certificates import certify

        res = certify(args.run, args.key, purge=not args.no_purge)
        print(f"model {res['model_version']}: {len(res['issued'])} certificate(s) issued, {res['certified']} in all; "
              f"{res['purged']} raw sample(s) purged -> {args.run / 'certificates'}")
        return 0
    if args.command == "rollout":
        from edge_qmul.federated.flwr_cli import FlwrCli
        from edge_qmul.federated.rollout import parse_waves

        parse_waves(args.waves)
        run_dir, bundle = args.run.resolve(), args.bundle.resolve()
        if not bundle.is_file():
            raise ConfigError(f"bundle {bundle} does not exist", "build it with `edge-qmul bundle`")
        if not (args.app / "pyproject.toml").is_file():
            raise ConfigError(f"{args.app} has no pyproject.toml with the Flower app", "pass --app CHECKOUT")
        cli = FlwrCli(args.superlink, args.flwr)
        run_id = cli.run_app(args.app, f'run-dir="{run_dir}" mode="rollout" bundle="{bundle}" waves="{args.waves}" '
                                       f"wave-pass-rate={float(args.pass_rate)} "
                                       f"max-forget-auc={float(args.max_forget_auc)} num-clients={args.num_clients}")
        print(f"rollout started as Flower run {run_id} on {args.superlink}")
        status = cli.wait(run_id, args.timeout)
        found = sorted((run_dir / "rollouts").glob(f"*-run{run_id}.json"))
        if status != "finished:completed" or not found:
            raise BundleError(f"Flower run {run_id} ended as {status}", f"see `flwr log {run_id} {args.superlink}`")
        summary = json.loads(found[-1].read_text())
        for w in summary["waves"]:
            print(f"wave {w['wave']} ({w['percent']}%): {len(w['passed'])}/{len(w['devices'])} passed"
                  + (f", rolled back {w['rolled_back']}" if w.get("rolled_back") else ""))
        print(f"rollout {summary['rollout_id']} of {summary['model_version']}: {summary['status']}")
        if summary["status"] != "completed":
            raise BundleError(f"rollout {summary['rollout_id']} was {summary['status']}",
                              "see `edge-qmul status --run DIR` for each device's reasons; ship a fixed bundle")
        return 0
    if args.command == "status":
        from edge_qmul.status import collect, render

        status = collect(args.run)
        print(json.dumps(status, indent=2) if args.json else render(status))
        return 0
    raise ConfigError(f"unknown command {args.command!r}", "see `edge-qmul --help`")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from edge_qmul import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return run_command(args)
    except EdgeQmulError as err:
        print(f"edge-qmul {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
