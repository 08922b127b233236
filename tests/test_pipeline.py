"""Pipeline stages: the feature cache the quantize stage writes for classifier-mode unlearning."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import copy_run

from edge_qmul import data, pipeline, quant


def test_feature_cache_equals_the_int8_features(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    rd.split.forget = pipeline.ledger_forget_ids(run)
    cache = pipeline.load_features(run, q, rd.split)
    assert cache is not None
    fx, _ = rd.tensors("forget")
    rx, _ = rd.tensors("retain")
    with torch.no_grad():
        extractor = quant.int8_features(q.qat)
        assert torch.equal(cache.forget, extractor(fx))
        assert torch.equal(cache.retain, extractor(rx))


def test_stale_feature_cache_is_not_used(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    assert pipeline.quantize(run, pipeline.QuantConfig(calibration_size=256))  # new deployed model
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    assert pipeline.load_features(run, q, rd.split) is not None  # re-written with the new model
    payload = torch.load(run / "features.pt", weights_only=True)
    payload["quantized_sha256"] = "0" * 64
    torch.save(payload, run / "features.pt")
    assert pipeline.load_features(run, q, rd.split) is None


def test_train_fraction_keeps_a_seeded_share_of_the_training_list(tmp_path: Path) -> None:
    from edge_qmul.config import DataConfig
    from edge_qmul.train import TrainConfig

    full = data.make_split(data.load_dataset("digits"), seed=0)
    pipeline.train(tmp_path / "half", DataConfig(dataset="digits", train_fraction=0.5), TrainConfig(epochs=1),
                   quiet=True)
    half = data.Split.load(tmp_path / "half" / "split.json")
    assert half.train == full.train[: round(0.5 * len(full.train))] and half.test == full.test
