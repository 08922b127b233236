"""The hybrid planner: generation checkpoints, exact replay (bit for bit), and the cost-based choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import copy_run

from edge_qmul import data, pipeline, planner
from edge_qmul.cli import main
from edge_qmul.config import DataConfig, QuantConfig
from edge_qmul.train import TrainConfig, load_checkpoint

RECIPE = TrainConfig(epochs=3, generations=8, batch_size=64)


@pytest.fixture(scope="module")
def generational(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("planner") / "run"
    pipeline.train(run, DataConfig(dataset="digits"), RECIPE, quiet=True)
    pipeline.quantize(run, QuantConfig(calibration_size=256), quiet=True)
    return run


def test_training_records_generations_and_a_checkpoint_per_phase(generational: Path) -> None:
    record = json.loads((generational / "generations.json").read_text())
    split = data.Split.load(generational / "split.json")
    gens = record["generations"]
    assert len(gens) == 8 and sum(gens, []) == split.train  # every training sample in exactly one generation
    assert [p["samples"] for p in record["phases"]] == [len(g) for g in gens]  # each phase: its new data
    for g in range(8):
        assert (generational / "generations" / f"phase-{g}.pt").is_file()
    final = planner.load_phase(generational / "generations", 7)
    model, *_ = load_checkpoint(generational / "float.pt")
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_auto_replays_the_newest_generation_exactly_bit_for_bit(generational: Path, tmp_path: Path) -> None:
    run = copy_run(generational, tmp_path)
    gens = json.loads((run / "generations.json").read_text())["generations"]
    forget = gens[7][:12]  # only the newest generation is touched
    assert main(["forget", "--run", str(run), "--ids", ",".join(map(str, forget)), "--request-id", "newest"]) == 0
    # the approximate alternative: Q-MUL on every layer with the paper code's settings (10 epochs, lr 0.01)
    assert main(["unlearn", "--run", str(run), "--method", "auto", "--layers", "all", "--lr", "0.01", "--epochs",
                 "10", "--quiet"]) == 0
    log = json.loads((run / "unlearn" / "auto" / "log.json").read_text())["log"]
    plan = log["plan"]
    assert plan["choice"] == "exact" and plan["first_affected"] == 7 and plan["replay_phases"] == [7]
    assert plan["exact_seconds"] <= plan["approx_seconds"] and log["seconds"] > 0

    # a retrain that never saw those samples: every phase from scratch, same seeds
    rd = pipeline.load_run_data(run)
    pool_x, pool_y = data.to_tensors(rd.source.train, list(range(len(rd.source.train.labels))))
    q = pipeline.load_quantized(run)
    reference, _ = planner.train_phases(q.model_cfg, RECIPE, pool_x, pool_y, gens, exclude=frozenset(forget))
    replayed, *_ = load_checkpoint(run / "unlearn" / "auto" / "float.pt")
    ref_state, got = reference.state_dict(), replayed.state_dict()
    assert ref_state.keys() == got.keys()
    assert all(torch.equal(ref_state[k], got[k]) for k in ref_state)  # bit for bit
    # and the generational retrain reference agrees with it too
    assert main(["unlearn", "--run", str(run), "--method", "retrain", "--quiet"]) == 0
    retrained, *_ = load_checkpoint(run / "unlearn" / "retrain" / "float.pt")
    assert all(torch.equal(ref_state[k], v) for k, v in retrained.state_dict().items())
    report = pipeline.evaluate(run, ["retrain", "auto"])
    assert report.methods["auto"]["avg_gap"] == pytest.approx(0.0, abs=1e-9)


def test_plan_prefers_qmul_when_replay_would_retrain_everything() -> None:
    gens = [list(range(0, 100)), list(range(100, 200)), list(range(200, 300))]
    cfg = TrainConfig(epochs=2, generations=3, batch_size=50)  # 2 steps per generation and epoch
    oldest = planner.plan(gens, {5}, cfg, step_seconds=0.5, quantize_seconds=0.5, approx_seconds=3.0)
    assert oldest.choice == "approximate" and oldest.first_affected == 0
    assert oldest.replay_samples == 2 * (99 + 100 + 100) and oldest.exact_seconds == pytest.approx(12 * 0.5 + 0.5)
    newest = planner.plan(gens, {250}, cfg, step_seconds=0.5, quantize_seconds=0.5, approx_seconds=3.0)
    assert newest.choice == "exact" and newest.replay_phases == [2]
    assert newest.exact_seconds == pytest.approx(4 * 0.5 + 0.5)



def test_auto_on_a_one_shot_run_records_both_estimates(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    assert main(["unlearn", "--run", str(run), "--method", "auto", "--quiet"]) == 0
    log = json.loads((run / "unlearn" / "auto" / "log.json").read_text())["log"]
    plan = log["plan"]
    assert plan["first_affected"] == 0 and plan["choice"] in ("exact", "approximate")
    assert plan["exact_seconds"] > 0 and plan["approx_seconds"] > 0
    assert ("qmul" in log) == (plan["choice"] == "approximate")


def test_generations_must_be_positive() -> None:
    with pytest.raises(Exception, match="generations"):
        TrainConfig(generations=0)
