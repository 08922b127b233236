"""The CLI end to end on digits, and its answers to bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_qmul import data
from edge_qmul.cli import main
from edge_qmul.run import Run

FAST = ["--epochs", "4", "--quiet"]


def _files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_demo_writes_split_report_and_table(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split = json.loads((demo_run / "split.json").read_text())
    assert {"dataset", "root", "train", "val", "test"} <= set(split) and "forget" not in split
    forget = Run(demo_run).forget_ids()  # the ledger is the forget set's one home
    assert split["dataset"] == "digits" and set(forget) <= set(split["train"])
    report = json.loads((demo_run / "report.json").read_text())
    assert report["dataset"] == "digits" and report["seed"] == 0
    assert report["forget_count"] == len(forget) == round(0.1 * len(split["train"]))
    methods = report["methods"]
    assert set(methods) == {"none", "retrain", "qmul", "finetune", "random_label", "grad_ascent", "famr"}
    for row in methods.values():
        assert set(row) == {"FA", "RA", "TA", "MIA", "avg_gap", "seconds"}
        assert all(0.0 <= row[k] <= 100.0 for k in ("FA", "RA", "TA", "MIA"))
        assert isinstance(row["seconds"], float)
    assert methods["retrain"]["avg_gap"] == 0.0
    assert methods["none"]["seconds"] == 0.0


def test_evaluate_reprints_the_table(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--run", str(demo_run), "--methods", "retrain,qmul"]) == 0
    out = capsys.readouterr().out
    assert "AvgGap" in out and "qmul" in out and "none" in out


def test_forget_is_idempotent_and_unlearn_follows_the_ledger(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(demo_run, tmp_path)
    train_ids = json.loads((run / "split.json").read_text())["train"]
    ids = ",".join(str(i) for i in train_ids[:3])
    assert main(["forget", "--run", str(run), "--ids", ids, "--request-id", "user-42"]) == 0
    assert main(["forget", "--run", str(run), "--ids", ids, "--request-id", "user-42"]) == 0
    assert "already recorded" in capsys.readouterr().out
    forget = Run(run).forget_ids()
    assert set(train_ids[:3]) <= set(forget)
    # results made for the old forget set are stale now
    assert main(["evaluate", "--run", str(run), "--methods", "qmul"]) == 4
    assert main(["unlearn", "--run", str(run), "--method", "qmul", "--epochs", "1", "--quiet"]) == 0
    log = json.loads((run / "unlearn" / "qmul" / "log.json").read_text())
    assert log["forget_count"] == len(forget) and "user-42" in log["request_ids"]
    assert log["log"]["config"]["update"] == "mixed"  # the recommended default (bench/qmul_vs_retrain.py)
    assert {"w_f", "w_r", "g_f", "g_r", "loss_mixed", "seconds"} <= set(log["log"]["epochs"][0])


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["unlearn", "--method", "magic"], 6, "choose one of"),
        (["forget", "--ids", "999999"], 5, "out of range"),
        (["forget", "--class", "42"], 5, "class"),
    ],
)
def test_bad_requests_change_nothing(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needle: str
) -> None:
    run = _copy(demo_run, tmp_path)
    before = _files(run)
    assert main([args[0], "--run", str(run), *args[1:]]) == code
    assert needle in capsys.readouterr().err
    assert _files(run) == before


def test_forget_id_pointing_at_a_test_sample(
    demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(demo_run, tmp_path)
    test_id = json.loads((run / "split.json").read_text())["test"][0]
    before = _files(run)
    assert main(["forget", "--run", str(run), "--ids", str(test_id)]) == 5
    assert "test sample" in capsys.readouterr().err
    assert _files(run) == before


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_checkpoint(demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    run = _copy(demo_run, tmp_path)
    if damage == "missing":
        (run / "float.pt").unlink()
    else:
        (run / "float.pt").write_bytes(b"\x00garbage" * 64)
    before = _files(run)
    assert main(["quantize", "--run", str(run)]) == 4
    err = capsys.readouterr().err
    assert "float.pt" in err and "fix:" in err
    assert _files(run) == before


def test_stale_quantized_model_is_refused(demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(demo_run, tmp_path)
    assert main(["train", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    assert main(["unlearn", "--run", str(run), "--method", "qmul"]) == 4
    assert "stale" in capsys.readouterr().err


def test_dataset_directory_without_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--dataset", "mnist", "--data-root", str(empty), *FAST]) == 3
    assert "train-images-idx3-ubyte" in capsys.readouterr().err
    assert not run.exists()


def test_unknown_toml_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochs = 2\nmomentun = 0.9\n")
    assert main(["demo", "--run", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "momentun" in err and "momentum" in err and str(cfg) in err
    assert not (tmp_path / "run").exists()


def test_demo_with_an_unknown_method_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--run", str(tmp_path / "run"), "--methods", "qmul,magic"]) == 6
    assert not (tmp_path / "run").exists()


def test_console_script_help_is_fast_and_lists_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from edge_qmul.cli import main; main(['--help'])"],
        capture_output=True, text=True, check=False,
    )
    assert "exit codes" in out.stdout and "forget" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, edge_qmul.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "False"


def test_quantize_refuses_a_float_model_trained_on_another_split(demo_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(demo_run, tmp_path)
    split = json.loads((run / "split.json").read_text())
    (run / "split.json").write_text(json.dumps({**split, "train": split["train"][::-1]}))
    Run(run).record("split")  # as if a stage had written it: the float model's own record must catch it
    before = (run / "quantized.pt").read_bytes()
    assert main(["quantize", "--run", str(run), "--quiet"]) == 4
    assert "is stale" in capsys.readouterr().err
    assert (run / "quantized.pt").read_bytes() == before


def _hashes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("victim", ["quantized.pt", "split.json", "float.pt", "unlearn/qmul/result.pt"])
def test_a_corrupted_artifact_is_refused_by_name(demo_run: Path, tmp_path: Path, victim: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(demo_run, tmp_path)
    data = bytearray((run / victim).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped in the middle
    (run / victim).write_bytes(bytes(data))
    before = _hashes(run)
    verb = ["export"] if victim.startswith("unlearn") else ["unlearn", "--method", "qmul", "--epochs", "1"]
    assert main([*verb, "--run", str(run), "--quiet"]) == 4
    err = capsys.readouterr().err
    assert victim.split("/")[-1] in err and "changed after it was written" in err
    assert _hashes(run) == before


def test_the_split_is_frozen_once_the_ledger_has_requests(demo_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy(demo_run, tmp_path)
    split_before = (run / "split.json").read_bytes()
    forgotten = Run(run).forget_ids()
    assert main(["train", "--run", str(run), "--seed", "7", "--epochs", "1", "--quiet"]) == 0
    assert (run / "split.json").read_bytes() == split_before  # the new seed trains, it does not re-split
    assert main(["quantize", "--run", str(run), "--quiet"]) == 0
    assert main(["unlearn", "--run", str(run), "--method", "finetune", "--epochs", "1", "--quiet"]) == 0
    assert set(forgotten) <= set(json.loads((run / "split.json").read_text())["train"])
    before = _hashes(run)
    assert main(["train", "--run", str(run), "--dataset", "synthetic", "--epochs", "1", "--quiet"]) == 5
    assert "start a new run directory" in capsys.readouterr().err
    assert _hashes(run) == before


def test_the_class_demo_separates_the_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "demo-class"
    assert main(["demo", "--run", str(run), "--forget-class", "3", "--quiet", "--methods", "retrain,qmul"]) == 0
    report = json.loads((run / "report.json").read_text())
    labels = data.load_dataset("digits").train.labels
    train = json.loads((run / "split.json").read_text())["train"]
    assert report["forget_count"] == sum(int(labels[i]) == 3 for i in train)
    rows = report["methods"]
    assert rows["retrain"]["FA"] == 0.0  # retrain never saw a 3
    assert rows["none"]["avg_gap"] > 20  # the untouched model is far from retrain
    assert rows["qmul"]["avg_gap"] < rows["none"]["avg_gap"]  # Q-MUL moves towards it
    assert "Warning" not in capsys.readouterr().err
