"""``edge-qmul`` command line: one small function per verb over ``eq.Run`` and the export / federated stages.

Heavy imports (torch, sklearn) happen inside the commands so ``edge-qmul --help`` is instant. Options
come from a TOML file (``--config``) and flags; flags win. Errors print one message with the fix and
exit with the code of their area (see ``edge_qmul.errors.EXIT_CODES``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_qmul.config import IMAGE_SIZE_RANGE, MAX_COUNT, MAX_SEED
from edge_qmul.errors import EXIT_CODES, BundleError, ConfigError, EdgeQmulError, ValidationFailed


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--ids must be integers separated by commas, got {text!r}") from err


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer in low..high, else a usage error (exit 2) stating the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r:.40} is not an integer in {low}..{high}")
        return value

    return parse


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in the interval, else a usage error (exit 2) stating the range."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"{text!r:.40} is not a finite number in {interval}")
        return value

    return parse


# Numeric flags, checked as they are parsed (a usage error, exit 2, that states the range); a flag that builds a
# config is checked there again, as the same key from a TOML file is.
COUNT = _int_in(1, MAX_COUNT)
CLASS = _int_in(0, MAX_COUNT)
SEED = _int_in(0, MAX_SEED)  # as DataConfig / TrainConfig seeds: torch takes a signed 64-bit seed
IMAGE_SIZE = _int_in(*IMAGE_SIZE_RANGE)  # as DataConfig.image_size
FRACTION = _float_in(0.0, 1.0, low_open=True, high_open=True)  # as data.select_forget: something must remain
REFERENCES = _int_in(2, 256)  # audit: reference models on complementary halves, each trained from scratch
SHARE = _float_in(0.0, 1.0, low_open=True)  # (0, 1]: pass rates, AUC limits (as FederatedConfig)
CLIENTS = _int_in(1, 100_000)  # rollout: fleet size
TIMEOUT = _float_in(0.0, 7 * 24 * 3600.0, low_open=True)  # rollout: seconds to wait, up to a week


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (default), fashion-mnist, mnist, cifar10, cifar100, synthetic, "
                   "imagefolder (class sub-folders of PNG/JPEG), npz (x_train, y_train, x_test, y_test)")
    g.add_argument("--data-root", dest="root", help="dataset directory or .npz file (fashion-mnist defaults to the "
                   "Debian package)")
    g.add_argument("--image-size", type=IMAGE_SIZE, help="imagefolder: resize every image to N x N (default: keep)")
    g.add_argument("--color", choices=["auto", "grayscale", "rgb"], help="imagefolder: channels (default auto)")
    g.add_argument("--seed", type=SEED, help="seed for the split, training and forget selection (default 0)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training recipe")
    g.add_argument("--model", help="small_cnn (default), resnet8, resnet20, resnet18, mobilenetv2, or your own: "
                   "FILE.py:FACTORY or package.module:FACTORY (a callable returning an nn.Module; it may take "
                   "num_classes, in_channels, image_size)")
    g.add_argument("--width", type=int, help="channel width (0 = the model's default)")
    g.add_argument("--width-multiplier", type=float, help="mobilenetv2: channel multiplier (default 1.0)")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--lr", type=float, help="training learning rate")
    g.add_argument("--batch-size", type=int, help="training batch size")
    g.add_argument("--generations", type=int, help="train in N data generations with checkpoints (for exact "
                   "replay by `unlearn --method auto`; default 1)")


def _add_quant_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--backend", help="x86 (default) or qnnpack (ARM)")
    g.add_argument("--calibration-size", type=int, help="calibration samples (default 1024)")


def _add_device_parser(sub: Any) -> None:
    """``edge-qmul device init|forget|status``: the device side, which runs on a lean install (no torch)."""
    help_ = "on a device: set up its own state, file deletion requests, see what became of them"
    p = sub.add_parser("device", help=help_, description=help_ + " (pip install 'edge-qmul[device]' is enough)")
    device = p.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    state_help = "the device's state directory (its key, the pinned fleet key, its sample index, its requests)"

    q = device.add_parser("init", help="set up the device: its Ed25519 key, the pinned fleet key, its samples",
                          description="Create --state (new or empty) with a fresh device key, the fleet's public "
                          "key and an index of the device's own samples by content id; never overwrites.")
    q.add_argument("--state", type=Path, required=True, help=state_help)
    q.add_argument("--dataset", required=True, choices=["imagefolder", "npz"],
                   help="imagefolder (class sub-folders of PNG/JPEG) or npz (x_train, y_train, x_test, y_test)")
    q.add_argument("--data-root", type=Path, required=True, help="the image folder or the .npz file")
    q.add_argument("--fleet-key", required=True, help="the fleet's Ed25519 public key, 64 hex digits "
                   "(public_key.hex from `edge-qmul keygen` on the server)")

    q = device.add_parser("forget", help="queue a signed deletion request; the next intake round sends it",
                          description="Queue one deletion request durably (it survives a crash once this "
                          "returns). Name only samples this device holds.")
    q.add_argument("--state", type=Path, required=True, help=state_help)
    sel = q.add_mutually_exclusive_group(required=True)
    sel.add_argument("--files", type=Path, nargs="+", metavar="PATH", help="image files the device holds")
    sel.add_argument("--hashes", type=Path, help="a file of content ids (sha256), one per line")
    sel.add_argument("--class", dest="klass", type=CLASS, help="every local sample of this class")
    sel.add_argument("--all", action="store_true", help="the device leaves the fleet: forget all it contributed")

    q = device.add_parser("status", help="pending, acknowledged, refused and honoured requests; the active model")
    q.add_argument("--state", type=Path, required=True, help=state_help)
    q.add_argument("--json", action="store_true", help="print JSON instead of text")


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
    forget_sel = p.add_mutually_exclusive_group()
    forget_sel.add_argument("--forget-fraction", type=FRACTION, default=0.1,
                            help="fraction of training samples to forget (default 0.1)")
    forget_sel.add_argument("--forget-class", type=CLASS, help="forget every training sample of this class instead")
    p.add_argument("--methods", help="comma-separated methods (default: retrain,qmul,finetune,random_label,"
                   "grad_ascent,famr)")

    for verb, help_ in (("train", "split the dataset and train the float model (or import weights: --weights)"),
                        ("import", "split the dataset and import your trained float weights (train --weights)")):
        p = cmd(verb, help_)
        _add_data_flags(p)
        _add_train_flags(p)
        p.add_argument("--weights", type=Path, required=verb == "import",
                       help="a float state_dict of the model (torch.save(model.state_dict(), FILE)); loaded with "
                       "weights_only=True instead of training")
        p.add_argument("--head", help="module name of the trainable head (default: the model's last nn.Linear)")
        p.add_argument("--provenance", type=Path, help="CSV 'device_id,sha256': which device contributed which "
                       "training sample (content ids); devices' deletion requests are checked against it")
        p.add_argument("--mean", help="imported weights: per-channel mean they were trained with (default 0)")
        p.add_argument("--std", help="imported weights: per-channel std they were trained with (default 1)")

    p = cmd("quantize", "PTQ to the deployed int8 model and build its QAT copy")
    _add_quant_flags(p)
    p.add_argument("--device", help="device profile (rpi4, rpi5, jetson-orin-nano, imx8mp, rk3588, x86-server) "
                   "or a profile TOML; picks the quantization engine")

    p = cmd("forget", "file a deletion request in the run's ledger")
    sel = p.add_mutually_exclusive_group(required=True)
    sel.add_argument("--ids", type=_ids, help="training-sample ids, e.g. 3,17,42")
    sel.add_argument("--hashes", type=Path, help="a file of content ids (sha256 of each sample's bytes), one per line")
    sel.add_argument("--class", dest="klass", type=CLASS, help="forget every training sample of this class")
    sel.add_argument("--count", type=COUNT, help="forget this many random training samples")
    sel.add_argument("--fraction", type=FRACTION, help="forget this fraction of the training samples")
    sel.add_argument("--leave", action="store_true", help="with --device: every sample the device contributed")
    p.add_argument("--device", help="file it as this device's request (its id in the training provenance): "
                   "with --hashes, --class or --leave, checked against what it contributed")
    p.add_argument("--request-id", help="request id (default: derived from the selection; re-filing is a no-op)")
    p.add_argument("--seed", type=SEED, default=0, help="seed for --count / --fraction")

    p = cmd("unlearn", "unlearn every request in the ledger with one method")
    p.add_argument("--method", required=True, help="qmul, retrain, finetune, random_label, grad_ascent, famr, "
                   "salun, scrub, l1_sparse, or auto (exact replay when cheaper, else qmul)")
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
    g.add_argument("--layers", help="which parameters move: classifier, last-K-blocks (the head and the K blocks "
                   "before it, e.g. last-1-blocks) or all")
    g.add_argument("--escalate", help="auto: scopes to try cheapest first while the validation split says the forget "
                   "set is remembered (default classifier,last-1-blocks,all; '' = only --layers)")
    g.add_argument("--norm-pooling", choices=["sum", "l2"], help="qmul: how gradient norms are pooled")
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
    p.add_argument("--references", type=REFERENCES, default=4,
                   help="reference models trained on random halves (default 4)")
    p.add_argument("--methods", help="unlearning results to audit (default: all in the run)")
    p.add_argument("--max-test", type=COUNT, default=2000, help="test samples used as non-members (default 2000)")

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
    p.add_argument("--accept-inconclusive", action="store_true",
                   help="certify on approximate-inconclusive evidence (a forget-set check could not tell at this "
                   "request size); recorded in each certificate")

    p = cmd("rollout", "roll a signed bundle out to the fleet in waves, over a running Flower SuperLink")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle from `edge-qmul bundle`")
    p.add_argument("--superlink", default="local", help="connection name in $FLWR_HOME/config.toml (default local)")
    p.add_argument("--app", type=Path, default=Path("."), help="the edge-qmul checkout with the Flower app's "
                   "pyproject.toml (default: the current directory)")
    p.add_argument("--waves", default="5,25,100", help="cumulative percentages of the fleet (default 5,25,100)")
    p.add_argument("--pass-rate", type=SHARE, default=1.0, help="share of a wave that must pass (default 1.0)")
    p.add_argument("--max-forget-auc", type=SHARE, default=0.75, help="on-board forget check limit (default 0.75)")
    p.add_argument("--num-clients", type=CLIENTS, default=3, help="fleet size (default 3)")
    p.add_argument("--timeout", type=TIMEOUT, default=1800.0, help="seconds to wait for the rollout (default 1800)")
    p.add_argument("--flwr", default="flwr", help="the Flower CLI executable (default: flwr on PATH)")

    p = cmd("status", "the run's ledger, models, bundles, rollouts and certificates at a glance")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = cmd("fleet", "TLS certificates and SuperNode keys for a Flower fleet (see the README's fleet recipe)",
            needs_run=False)
    fleet = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    q = fleet.add_parser("certs", help="a CA and the SuperLink's TLS certificate (ca.pem, server.pem, keys 0600)",
                         description="Write ca.pem, ca.key, server.pem and server.key into --out; never overwrites.")
    q.add_argument("--out", type=Path, required=True, help="directory for the certificates and keys")
    q.add_argument("--host", action="append", dest="hosts", metavar="HOST",
                   help="an IP address or DNS name SuperNodes use to reach the SuperLink; repeat for several "
                   "(default: 127.0.0.1 and localhost)")
    q.add_argument("--days", type=_int_in(1, 3650), default=365, help="server certificate validity (default 365)")
    q = fleet.add_parser("node-key", help="a SuperNode's authentication key pair (EC P-384, OpenSSH format)",
                         description="Write --out (private key, 0600) and --out.pub (register it with "
                         "`flwr supernode register`); never overwrites.")
    q.add_argument("--out", type=Path, required=True, help="path of the private key; the public key is PATH.pub")
    _add_device_parser(sub)
    return parser


def _overrides(args: argparse.Namespace, keys: Sequence[str]) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in keys}


def _methods(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(t) for t in text.replace(",", " ").split())
    except ValueError as err:
        raise ConfigError(f"{flag} {text!r} is not a list of numbers",
                          f"e.g. {flag} 0.5, or one per channel: {flag} 0.49,0.48,0.45") from err


DATA_KEYS = ("dataset", "root", "seed", "image_size", "color")
TRAIN_KEYS = ("model", "width", "width_multiplier", "epochs", "lr", "batch_size", "generations")
QUANT_KEYS = ("backend", "calibration_size")
UNLEARN_KEYS = ("epochs", "lr", "batch_size", "update", "label_variant", "retain_batches", "retain_ratio",
                "repair_batches", "layers", "norm_batches", "escalate", "norm_pooling")


class Context:
    """What every verb needs: its parsed flags, the TOML tables, and the stage configs built from both."""

    def __init__(self, args: argparse.Namespace) -> None:
        from edge_qmul import config

        self.args = args
        self.toml = config.load_toml(getattr(args, "config", None))  # the device verbs take no --config

    def resolve(self, section: str, keys: Sequence[str], extra: dict[str, Any] | None = None) -> Any:
        from edge_qmul import config

        values = {**_overrides(self.args, keys), **(extra or {})}
        return config.resolve(section, self.toml, values)  # type: ignore[call-overload]

    def data(self) -> Any:
        return self.resolve("data", DATA_KEYS)

    def train(self) -> Any:
        return self.resolve("train", TRAIN_KEYS, {"seed": getattr(self.args, "seed", None)})

    def quant(self) -> Any:
        return self.resolve("quant", QUANT_KEYS)

    def run(self) -> Any:
        from edge_qmul.api import Run

        return Run(self.args.run)


def cmd_demo(c: Context) -> int:
    from edge_qmul import demo, pipeline

    args = c.args
    run_dir = args.run or demo.new_run_dir()
    methods = _methods(args.methods)
    unlearn_toml = dict(c.toml.get("unlearn", {}))  # a demo's [unlearn] table configures qmul
    if unlearn_toml.pop("method", "qmul") != "qmul":
        raise ConfigError("a demo's [unlearn] table configures qmul", 'leave out method = ... or set it to "qmul"')
    demo.demo(run_dir, c.data(), c.train(), c.quant(), forget_fraction=args.forget_fraction,
              forget_class=args.forget_class,
                  methods=tuple(methods) if methods else demo.DEMO_METHODS, unlearn_overrides=unlearn_toml,
                  quiet=args.quiet)
    print(f"report: {pipeline.as_run(run_dir).path('report')}")
    return 0


def cmd_train(c: Context) -> int:
    args = c.args
    res = c.run().train(c.data(), c.train(), weights=args.weights, head=args.head or "", provenance=args.provenance,
                        mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"), quiet=args.quiet)
    how = "imported weights" if res.imported else f"trained ({res.seconds:.1f}s)"
    print(f"{res.model}: {how}; float accuracy train {res.train_acc:.2f}%, test {res.test_acc:.2f}% -> {args.run}")
    return 0


def cmd_quantize(c: Context) -> int:
    args = c.args
    extra: dict[str, Any] = {}
    if args.device:
        from edge_qmul.devices.profiles import load_profile

        engine = load_profile(args.device).quant_engine
        if args.backend and args.backend != engine:
            raise ConfigError(f"--backend {args.backend} contradicts --device {args.device} (engine {engine})",
                              "pass only one of them")
        extra["backend"] = engine
    info = c.run().quantize(c.resolve("quant", QUANT_KEYS, extra), quiet=args.quiet)
    print(json.dumps(info.to_dict(), indent=2))
    return 0


def _read_hashes(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read hashes file {path} ({err.__class__.__name__})",
                          "pass a text file with one sha256 per line") from err
    return [line.split()[0] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def cmd_forget(c: Context) -> int:
    args = c.args
    if args.seed is None:
        raise ConfigError("--seed needs a value", "pass --seed N")
    hashes = _read_hashes(args.hashes) if args.hashes is not None else None
    out = c.run().forget(ids=args.ids, hashes=hashes, klass=args.klass, count=args.count, fraction=args.fraction,
                         request_id=args.request_id, seed=args.seed, source="cli", device=args.device,
                         leave=args.leave)
    state = "recorded" if out.added else "already recorded (no change)"
    print(f"request {out.request_id}: {out.samples} samples {state}; {out.forget_total} to forget in all")
    return 0


def cmd_unlearn(c: Context) -> int:
    args = c.args
    # the method's class (--method wins over the table's method key) takes the table and the flags given
    cfg = c.resolve("unlearn", UNLEARN_KEYS, {"method": args.method})
    run = c.run()
    meta = run.unlearn(cfg, quiet=args.quiet)
    print(f"{args.method}: unlearned {meta.forget_count} samples in {meta.seconds:.1f}s "
          f"-> {run.path('result', method=args.method).parent}")
    return 0


def cmd_evaluate(c: Context) -> int:
    from edge_qmul.demo import format_table

    print(format_table(c.run().evaluate(_methods(c.args.methods))))
    return 0


def cmd_export(c: Context) -> int:
    from edge_qmul.export.stage import export_run

    res = export_run(c.run(), c.args.method)
    print(f"wrote {res.int8_path} and {res.fp32_path}")
    print(f"optimised int8 graph: {res.int8_kernels} int8 kernels; ops {json.dumps(res.op_counts, sort_keys=True)}")
    return 0


def cmd_validate(c: Context) -> int:
    from edge_qmul.devices.profiles import load_profile
    from edge_qmul.export.budgets import load_budgets
    from edge_qmul.export.validate import check_mark, check_value_text, validate_run

    args = c.args
    run = c.run()
    v = validate_run(run, load_profile(args.device), load_budgets(args.budgets), method=args.method)
    for name, check in v.checks.items():
        print(f"{check_mark(check)} {name:<20} {check_value_text(check):>22}  limit {check['limit']:.4g}")
        if "inconclusive" in check:
            print(f"  inconclusive: {check['inconclusive']}")
    print(f"report: {run.path('validation_md')}")
    if not v.passed:
        failed = [n for n, check in v.checks.items() if not check["passed"]]
        raise ValidationFailed(f"checks over budget: {', '.join(failed)}", f"see {run.path('validation_md')}")
    return 0


def cmd_audit(c: Context) -> int:
    from edge_qmul.audit import audit_run

    args = c.args
    run = c.run()
    methods = _methods(args.methods)
    report = audit_run(run.root, methods if methods is not None else run.results(), k=args.references,
                       max_test=args.max_test, quiet=args.quiet)
    print(f"{'target':<14}{'AUC':>8}{'TPR@1%':>9}{'TPR@0.1%':>10}  ({report['references']} references, "
          f"{report['forget']} forget vs {report['test']} test samples)")
    for r in report["targets"]:
        print(f"{r['target']:<14}{r['auc']:8.3f}{r['tpr_at_1fpr']:9.3f}{r['tpr_at_01fpr']:10.3f}")
    return 0


def cmd_keygen(c: Context) -> int:
    from edge_qmul.export.bundle import keygen

    key_path, pub_path = keygen(c.args.out)
    print(f"signing key {key_path} (keep it secret); public key {pub_path}: {pub_path.read_text().strip()}")
    return 0


def cmd_bundle(c: Context) -> int:
    from edge_qmul.devices.profiles import load_profile
    from edge_qmul.export.bundle import build_bundle, read_manifest
    from edge_qmul.federated.rollout import current_fleet_version

    args = c.args
    profile = load_profile(args.device)
    parent = args.parent if args.parent is not None else current_fleet_version(args.run, profile.name)
    path = build_bundle(c.run(), profile, args.key, out=args.out, parent=parent)
    manifest = read_manifest(path)
    print(f"bundle {path}: model {manifest['model_version']} for {manifest['device']}, "
          f"{len(manifest['files'])} files, honours {len(manifest['honoured_request_ids'])} request(s)")
    return 0


def cmd_certify(c: Context) -> int:
    from edge_qmul.export.certificates import certify

    run = c.run()
    res = certify(run, c.args.key, purge=not c.args.no_purge, accept_inconclusive=c.args.accept_inconclusive)
    print(f"model {res['model_version']} ({res['level']}): {len(res['issued'])} certificate(s) issued, "
          f"{res['certified']} in all; "
          f"{res['purged']} raw sample(s) purged -> {run.path('certificates')}")
    return 0


def cmd_rollout(c: Context) -> int:
    from edge_qmul.federated.flwr_cli import FlwrCli
    from edge_qmul.federated.rollout import parse_waves

    args = c.args
    parse_waves(args.waves)
    run, bundle = c.run(), args.bundle.resolve()
    run_dir = run.root.resolve()
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
    found = sorted(run.path("rollouts").glob(f"*-run{run_id}.json"))
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


def cmd_status(c: Context) -> int:
    from edge_qmul.status import collect, render

    status = collect(c.args.run)
    print(json.dumps(status, indent=2) if c.args.json else render(status))
    return 0


def cmd_fleet(c: Context) -> int:
    from edge_qmul.federated import certs

    args = c.args
    if args.fleet_command == "certs":
        made = certs.make_certs(args.out, tuple(args.hosts or certs.DEFAULT_HOSTS), days=args.days)
        print(f"CA {made.ca_cert} (give it to every SuperNode and flwr CLI; keep {made.ca_key} offline)\n"
              f"SuperLink certificate {made.server_cert} for {', '.join(made.hosts)}, key {made.server_key}")
    else:
        pair = certs.make_node_key(args.out)
        print(f"SuperNode private key {pair.private} (stays on the board); register {pair.public} with "
              f"`flwr supernode register {pair.public} <connection>`")
    return 0


def cmd_device(c: Context) -> int:
    from edge_qmul.devices import state  # lean: no torch, so this runs on a device install

    args = c.args
    if args.device_command == "init":
        d = state.DeviceState.init(args.state, state.DataSpec(args.dataset, args.data_root), args.fleet_key)
        with d:
            print(f"device {d.device_id}: {d.sample_count()} samples in {len(d.classes)} classes from {d.data_root}; "
                  f"state in {args.state}")
        return 0
    with state.DeviceState.open(args.state) as d:
        if args.device_command == "status":
            st = d.status()
            print(json.dumps(st.to_dict(), indent=2) if args.json else state.render_status(st))
            return 0
        hashes = _read_hashes(args.hashes) if args.hashes is not None else None
        filed = d.forget(files=args.files, hashes=hashes, label=args.klass, leave=args.all)
    what = {"samples": f"{filed.samples} sample(s)", "class": f"class {filed.klass} ({filed.samples} sample(s))",
            "leave": "the device leaves the fleet"}[filed.kind]
    print(f"request {filed.request_id} queued: {what}; the next intake round sends it")
    return 0


COMMANDS = {
    "demo": cmd_demo, "train": cmd_train, "import": cmd_train, "quantize": cmd_quantize, "forget": cmd_forget,
    "unlearn": cmd_unlearn, "evaluate": cmd_evaluate, "export": cmd_export, "validate": cmd_validate,
    "audit": cmd_audit, "keygen": cmd_keygen, "bundle": cmd_bundle, "certify": cmd_certify, "rollout": cmd_rollout,
    "status": cmd_status, "device": cmd_device, "fleet": cmd_fleet,
}


def run_command(args: argparse.Namespace) -> int:
    if args.command not in COMMANDS:
        raise ConfigError(f"unknown command {args.command!r}", "see `edge-qmul --help`")
    return COMMANDS[args.command](Context(args))


def _quiet_library_warnings() -> None:
    """torch's own deprecation notices (TypedStorage, quantized tensor creation, the TorchScript ONNX
    exporter) concern its internals, not the user's command: keep them off the terminal. Our own warnings
    and every error still show."""
    import warnings

    for module in ("torch", "onnxscript", "onnx"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


# Modules of the install extras (pyproject.toml): a verb that needs one the install lacks says which extra brings it.
EXTRA_OF_MODULE = {"torch": "server", "sklearn": "server", "onnx": "server", "matplotlib": "server", "PIL": "server",
                   "rich": "server", "cryptography": "device", "onnxruntime": "device", "flwr": "device"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error it has printed (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.version:
        from edge_qmul import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _quiet_library_warnings()
    try:
        return run_command(args)
    except EdgeQmulError as err:
        print(f"edge-qmul {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except ModuleNotFoundError as err:
        if err.name not in EXTRA_OF_MODULE:  # a missing submodule of an installed package is a bug: show it
            raise
        print(f"edge-qmul {args.command}: error: {err.name} is not installed: "
              f"pip install 'edge-qmul[{EXTRA_OF_MODULE[err.name]}]'", file=sys.stderr)
        return ConfigError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
