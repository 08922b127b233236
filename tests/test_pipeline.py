"""Pipeline stages: the feature cache the quantize stage writes for classifier-mode unlearning."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import copy_run

from edge_qmul import pipeline, quant


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
