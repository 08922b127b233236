"""Bad input through the CLI (issue 13, items 5 and 6): the documented exit code, one message naming the file or
value with the fix, no traceback, and the run directory byte-identical before and after."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import copy_run
from onnx import TensorProto, helper, numpy_helper

from edge_qmul.cli import main
from edge_qmul.errors import EXIT_CODES
from edge_qmul.ledger import Ledger

DEEP = 50_000  # levels of nesting: past Python's recursion limit in tomllib


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def _refused(argv: list[str], run: Path, code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run the CLI, expect exit ``code`` with every needle in stderr and the run directory unchanged."""
    assert code in EXIT_CODES
    before = _snapshot(run)
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        got = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(run) == before
    return err


@pytest.fixture
def run(demo_run: Path, tmp_path: Path) -> Path:
    return copy_run(demo_run, tmp_path)


# --- 1. an ONNX model whose logits do not have the run's classes (was an IndexError) ------------------------------


def _linear_onnx(path: Path, classes: int | str) -> None:
    """pixels [batch, 1, 8, 8] -> logits [batch, classes]: honours the I/O contract except for the class count."""
    n = classes if isinstance(classes, int) else 7
    weight = numpy_helper.from_array(np.random.default_rng(0).random((64, n), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["flat"]), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "linear", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize("classes", [7, "classes"], ids=["7-outputs", "dynamic-classes"])
def test_validate_refuses_an_onnx_without_the_runs_classes(run: Path, capsys: pytest.CaptureFixture[str],
                                                           classes: int | str) -> None:
    _linear_onnx(run / "model.int8.onnx", classes)
    err = _refused(["validate", "--run", str(run), "--device", "x86-server"], run, 8, capsys,
                   "model.int8.onnx", "expected [batch, 10]", "fix: export")
    assert "IndexError" not in err


# --- 2. an empty retain set (retrain: ZeroDivisionError; qmul / finetune "succeeded") -----------------------------


def test_forget_refuses_a_request_that_leaves_no_training_sample(run: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    train = json.loads((run / "split.json").read_text())["train"]
    _refused(["forget", "--run", str(run), "--count", str(len(train))], run, 5, capsys,
             "would forget every remaining training sample", "fix:")


@pytest.mark.parametrize("method", ["retrain", "qmul", "finetune"])
def test_unlearn_refuses_an_empty_retain_set(run: Path, capsys: pytest.CaptureFixture[str], method: str) -> None:
    train = json.loads((run / "split.json").read_text())["train"]
    with Ledger(run / "ledger.sqlite") as ledger:  # e.g. device-filed requests that together cover everything
        ledger.add("everything", "samples", {"ids": len(train)}, train, source="device:0")
    _refused(["unlearn", "--run", str(run), "--method", method, "--quiet"], run, 6, capsys,
             f"{method}: the retain set is empty", f"all {len(train)} training samples", "fix:")


def test_export_without_the_run_record_names_it(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run / "run.json").unlink()  # was a FileNotFoundError traceback
    _refused(["export", "--run", str(run)], run, 4, capsys, "run.json does not exist", "edge-qmul train")


# --- 3. TOML nested 50,000 deep (was a RecursionError) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "header", "verb"),
    [("--config", "[train]\nepochs = ", "train"), ("--budgets", "[budgets]\nta_drop = ", "validate"),
     ("--device", "name = ", "validate")],
)
def test_deeply_nested_toml_is_a_config_error(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              flag: str, header: str, verb: str) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text(header + "[" * DEEP + "]" * DEEP + "\n")
    argv = [verb, "--run", str(run), flag, str(deep)]
    if verb == "validate" and flag != "--device":
        argv += ["--device", "x86-server"]
    _refused(argv, run, 2, capsys, str(deep), "nests arrays or tables too deeply", "fix:")


# --- 4. budgets outside their metric's range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "needles"),
    [
        ("parity_top1 = -5", ("parity_top1 = -5", "[0, 100]")),
        ("parity_top1 = 100.5", ("parity_top1 = 100.5", "[0, 100]")),
        ("ta_drop = inf", ("ta_drop = inf", "finite", "[-100, 100]")),
        ("loss_auc = nan", ("loss_auc = nan", "[0, 1]")),
        ("loss_auc = 60", ("loss_auc = 60", "[0, 1]")),
        ("max_logit_diff = -1", ("max_logit_diff = -1", "[0, inf)")),
        ("size_bytes = 1e400", ("size_bytes = inf", "[0, inf)")),
        ("size_bytes = -1", ("size_bytes = -1", "[0, inf)")),
        ("ta_drop = true", ("ta_drop = True is not a number", "[-100, 100]")),
        ('parity_top1 = "high"', ("parity_top1 = 'high' is not a number", "[0, 100]")),
        ('size_bytes = "profile"', ("size_bytes", "no size_bytes budget", "[0, inf)")),
        ("confidence = 0", ("confidence = 0", "[0.5, 1)")),
        ("confidence = nan", ("confidence = nan", "[0.5, 1)")),
    ],
)
def test_budgets_outside_their_range_are_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 line: str, needles: tuple[str, ...]) -> None:
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(f"[budgets]\n{line}\n")
    _refused(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(budgets)], run, 2, capsys,
             str(budgets), *needles, "fix: give")


def test_every_check_states_its_range() -> None:
    from edge_qmul.export.budgets import CHECKS, load_budgets

    for check in CHECKS.values():
        low, high = check.valid
        assert low < high and check.range_text().startswith(f"[{low:g}, ")
    for name, limit in load_budgets().limits.items():  # the shipped defaults lie inside their ranges
        assert limit == "profile" if CHECKS[name].profile and isinstance(limit, str) else \
            CHECKS[name].valid[0] <= float(limit) <= CHECKS[name].valid[1]


# --- 5. device profiles: types and finite positive ranges -------------------------------------------------------

RPI4 = {"name": '"board"', "description": '"a board"', "arch": '"aarch64"', "cpu": '"cortex-a72"', "cores": "4",
        "isa": '["neon"]', "ram_mb": "4096", "providers": '["CPUExecutionProvider"]', "threads": "4",
        "quant_engine": '"qnnpack"', "latency_budget_ms": "25.0", "memory_budget_mb": "512.0"}


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("threads", "0", "threads = 0 must be between 1 and cores = 4"),
        ("cores", "0", "cores = 0 must be a finite number > 0"),
        ("cores", "99999999999999999999999999999999", "cores = 99999999999999999999999999999999 must be"),
        ("ram_mb", "0", "ram_mb = 0 must be"),
        ("ram_mb", "true", "ram_mb = True should be of type int"),
        ("latency_budget_ms", "inf", "latency_budget_ms = inf must be a finite number"),
        ("latency_budget_ms", "nan", "latency_budget_ms = nan must be a finite number"),
        ("latency_budget_ms", "-1.0", "latency_budget_ms = -1.0 must be"),
        ("latency_budget_ms", "1" + "0" * 400, "latency_budget_ms = 1000"),
        ("memory_budget_mb", "inf", "memory_budget_mb = inf must be a finite number"),
        ("memory_budget_mb", '"512"', "memory_budget_mb = '512' should be of type float"),
        ("name", '"../../etc"', "the name must be 1-64 characters"),
    ],
)
def test_device_profile_values_are_checked(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           key: str, value: str, needle: str) -> None:
    board = tmp_path / "board.toml"
    board.write_text("".join(f"{k} = {value if k == key else v}\n" for k, v in RPI4.items()))
    _refused(["validate", "--run", str(run), "--device", str(board)], run, 2, capsys, str(board), needle, "fix:")


# --- 6. status shows an unreadable artifact as an error, and still exits 0 ---------------------------------------


def test_status_shows_a_corrupt_validation_record(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = run / "validation.json"
    corrupt.write_bytes(b'{"passed": tru')
    before = _snapshot(run)
    assert main(["status", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"error: {corrupt} is unreadable (JSONDecodeError)" in out
    assert main(["status", "--run", str(run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert f"{corrupt} is unreadable (JSONDecodeError)" in status["errors"]
    assert "validation" not in status
    assert _snapshot(run) == before


# --- 7. numeric flags: bounds stated in the usage error (exit 2) ------------------------------------------------


ROLLOUT = ["rollout", "--bundle", "b.tar"]


@pytest.mark.parametrize(
    ("argv", "flag", "value", "allowed"),
    [
        (["demo"], "--forget-fraction", "1.0", "a finite number in (0, 1)"),
        (["demo"], "--forget-fraction", "nan", "a finite number in (0, 1)"),
        (["forget"], "--count", "0", "an integer in 1..2147483647"),
        (["forget"], "--count", "1e9", "an integer in 1..2147483647"),
        (["forget"], "--class", "-1", "an integer in 0..2147483647"),
        (["forget"], "--fraction", "inf", "a finite number in (0, 1)"),
        (["forget", "--count", "3"], "--seed", "-1", "an integer in 0..9223372036854775807"),
        (["train"], "--seed", "1" * 30, "an integer in 0..9223372036854775807"),
        (["train"], "--image-size", "2", "an integer in 4..1024"),
        (["audit"], "--references", "1", "an integer in 2..256"),
        (["audit"], "--references", "100000", "an integer in 2..256"),
        (["audit"], "--max-test", "0", "an integer in 1..2147483647"),
        (ROLLOUT, "--pass-rate", "0", "a finite number in (0, 1]"),
        (ROLLOUT, "--pass-rate", "nan", "a finite number in (0, 1]"),
        (ROLLOUT, "--max-forget-auc", "1.5", "a finite number in (0, 1]"),
        (ROLLOUT, "--num-clients", "0", "an integer in 1..100000"),
        (ROLLOUT, "--timeout", "inf", "a finite number in (0, 604800]"),
        (ROLLOUT, "--timeout", "-5", "a finite number in (0, 604800]"),
    ],
)
def test_numeric_flags_state_their_range(run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str,
                                         value: str, allowed: str) -> None:
    _refused([argv[0], "--run", str(run), *argv[1:], flag, value], run, 2, capsys,
             f"error: argument {flag}: {value!r} is not {allowed}")


@pytest.mark.parametrize(
    ("table", "argv", "needles"),
    [
        ("[unlearn]\nlr = true\n", ["unlearn", "--method", "qmul"], ("unlearn.lr = True should be of type float",)),
        ("[train]\nepochs = 99999999999999999999\n", ["train"], ("train.epochs=99999999999999999999", "1..10000")),
        ("[unlearn]\nepochs = 99999999999999999999\n", ["unlearn", "--method", "qmul"],
         ("unlearn.epochs=99999999999999999999", "0..10000")),
        ("", ["unlearn", "--method", "retrain", "--epochs", "400"], ("unknown option(s) epochs for method 'retrain'",
                                                                     "set those in [train]")),
    ],
)
def test_config_values_are_checked_through_the_cli(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   table: str, argv: list[str], needles: tuple[str, ...]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(table)
    _refused([argv[0], "--run", str(run), "--config", str(config), *argv[1:]], run, 2, capsys, *needles, "fix:")
