"""Pipeline stages: the feature cache the quantize stage writes for classifier-mode unlearning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import copy_run

from edge_qmul import data, pipeline, quant
from edge_qmul.config import method_config
from edge_qmul.errors import CheckpointError
from edge_qmul.run import Run


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
        extractor = quant.int8_features(q.qat, head=q.model_cfg.head)  # the features the head reads
        assert torch.equal(cache.forget, extractor(fx))
        assert torch.equal(cache.retain, extractor(rx))


def test_feature_cache_leaves_purged_samples_out_and_refuses_a_cache_missing_one(
    demo_run: Path, tmp_path: Path
) -> None:
    run = copy_run(demo_run, tmp_path)
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    rd.split.forget = pipeline.ledger_forget_ids(run)
    full = pipeline.load_features(run, q, rd.split)
    assert full is not None and full.val is not None
    retain = rd.split.retain()
    purged = frozenset(retain[::7] + rd.split.forget[:2])
    cache = pipeline.load_features(run, q, rd.split, purged)
    assert cache is not None and cache.val is not None
    keep_f = [k for k, i in enumerate(rd.split.forget) if i not in purged]
    keep_r = [k for k, i in enumerate(retain) if i not in purged]
    assert torch.equal(cache.forget, full.forget[keep_f]) and torch.equal(cache.retain, full.retain[keep_r])
    assert torch.equal(cache.val, full.val)

    payload = torch.load(run / "features.pt", weights_only=True)
    held = payload["indices"] != retain[3]
    payload["indices"], payload["values"] = payload["indices"][held], payload["values"][held]
    torch.save(payload, run / "features.pt")
    Run(run).record("features")  # as a stage writing such a cache would
    assert pipeline.load_features(run, q, rd.split) is None  # a sample it does not hold: computed afresh


def test_stale_feature_cache_is_not_used(demo_run: Path, tmp_path: Path) -> None:
    run = copy_run(demo_run, tmp_path)
    assert pipeline.quantize(run, pipeline.QuantConfig(calibration_size=256))  # new deployed model
    q = pipeline.load_quantized(run)
    rd = pipeline.load_run_data(run)
    assert pipeline.load_features(run, q, rd.split) is not None  # re-written with the new model
    payload = torch.load(run / "features.pt", weights_only=True)
    payload["quantized_sha256"] = "0" * 64
    torch.save(payload, run / "features.pt")
    Run(run).record("features")  # a cache made for another deployed model, by a stage: stale, not corrupt
    assert pipeline.load_features(run, q, rd.split) is None
    (run / "features.pt").write_bytes((run / "features.pt").read_bytes()[:-1])  # corrupt: refused, not reused
    with pytest.raises(CheckpointError, match="changed after it was written"):
        pipeline.load_features(run, q, rd.split)


def test_train_fraction_keeps_a_seeded_share_of_the_training_list(tmp_path: Path) -> None:
    from edge_qmul.config import DataConfig
    from edge_qmul.train import TrainConfig

    full = data.make_split(data.load_dataset("digits"), seed=0)
    pipeline.train(tmp_path / "half", DataConfig(dataset="digits", train_fraction=0.5), TrainConfig(epochs=1),
                   quiet=True)
    half = data.Split.load(tmp_path / "half" / "split.json")
    assert half.train == full.train[: round(0.5 * len(full.train))] and half.test == full.test


def test_head_only_unlearning_reads_no_pixels_and_matches_computing_features_afresh(
    demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the feature cache, qmul loads labels only for retain / val (no pixels) and gives the same
    model, bit for bit, as a run without the cache (features computed from pixels by the int8 model)."""
    cached = copy_run(demo_run, tmp_path / "cached")
    fresh = copy_run(demo_run, tmp_path / "fresh")
    (fresh / "features.pt").unlink()
    cfg = method_config("qmul", {"epochs": 2})
    gathered: list[str] = []
    tensors = pipeline.RunData.tensors
    monkeypatch.setattr(pipeline.RunData, "tensors", lambda self, which: gathered.append(which) or tensors(self, which))
    pipeline.run_unlearn(cached, cfg, quiet=True)
    assert gathered == ["forget"]  # retain / val pixels never gathered
    pipeline.run_unlearn(fresh, cfg, quiet=True)
    assert gathered[1:] == ["forget", "retain", "val"]
    a, b = (torch.load(r / "unlearn" / "qmul" / "result.pt", weights_only=True) for r in (cached, fresh))
    assert a["int8_state"].keys() == b["int8_state"].keys()
    for key in a["int8_state"]:
        assert _same(a["int8_state"][key], b["int8_state"][key]), key


def _same(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return torch.equal(x.dequantize() if x.is_quantized else x, y.dequantize() if y.is_quantized else y)
    if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y, strict=True))
    return x == y
