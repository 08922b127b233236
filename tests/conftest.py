"""Shared fixtures: a small CNN trained on scikit-learn digits in a few seconds."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from edge_qmul import data, quant
from edge_qmul.models import ModelConfig
from edge_qmul.train import TrainConfig, train_float

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(2)


class Digits:
    """Digits split, a trained float model, its PTQ int8 model and calibration batches."""

    def __init__(self) -> None:
        self.source = data.load_dataset("digits")
        self.split = data.make_split(self.source, seed=0)
        self.split.forget = data.select_forget(self.split, self.source.train.labels, fraction=0.1, seed=0)
        mean, std = data.channel_stats(self.source.train, self.split.train)
        self.model_cfg = ModelConfig("small_cnn", 1, 8, 10, tuple(mean), tuple(std), width=16)
        self.train_cfg = TrainConfig(epochs=8, lr=0.05, batch_size=64)
        pool = self.source.train
        self.train_x, self.train_y = data.to_tensors(pool, self.split.train)
        self.forget_x, self.forget_y = data.to_tensors(pool, self.split.forget)
        self.retain_x, self.retain_y = data.to_tensors(pool, self.split.retain())
        self.test_x, self.test_y = data.to_tensors(pool, self.split.test)
        self.model, _ = train_float(self.model_cfg, self.train_cfg, self.train_x, self.train_y, quiet=True)
        self.calib = list(self.train_x[:512].split(256))
        self.int8 = quant.quantize_ptq(self.model, self.calib, "x86")

    def qat(self) -> torch.nn.Module:
        qat = quant.prepare_qat(self.model, "x86", self.calib[0])
        quant.calibrate_qat(qat, self.calib)
        return qat


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits demo run directory (4 training epochs): every method's result and report.json."""
    from edge_qmul.cli import main

    run = tmp_path_factory.mktemp("cli") / "demo"
    assert main(["demo", "--run", str(run), "--epochs", "4", "--quiet"]) == 0
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.fixture
def flower_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Flower state in a temporary FLWR_HOME, no telemetry, and the TaskIdentity Flower sets in a real
    ServerApp / ClientApp process (messages take their run and sender from it): the "server" of run 1."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
