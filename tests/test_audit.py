"""Reference-model (LiRA-style) audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run

from edge_qmul.audit import References, phi
from edge_qmul.cli import main


def test_phi_is_the_logit_of_the_true_label_probability() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = logits.softmax(1)
    y = torch.tensor([0, 2])
    expected = torch.log(p[[0, 1], y] / (1 - p[[0, 1], y])).numpy()
    assert np.allclose(phi(logits, y), expected)


def test_out_statistics_use_only_models_that_left_the_sample_out() -> None:
    refs = References(np.array([[1.0, 5.0], [3.0, 7.0], [100.0, 9.0]]),
                      np.array([[False, False], [False, False], [True, False]]))
    mu, sigma = refs.out_stats()
    assert np.allclose(mu, [2.0, 7.0]) and sigma > 0  # sample 0 ignores the reference that trained on it
    with pytest.raises(ValueError, match="every reference"):
        References(np.ones((2, 1)), np.ones((2, 1), dtype=bool)).out_stats()


def test_audit_separates_the_original_model_from_the_retrained_one(demo_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(demo_run, tmp_path)
    assert main(["audit", "--run", str(run), "--references", "4", "--methods", "retrain,qmul"]) == 0
    report = json.loads((run / "audit.json").read_text())
    by = {r["target"]: r for r in report["targets"]}
    assert set(by) == {"original", "retrain", "qmul"} and report["reference_out_per_forget_sample"] > 1
    for r in by.values():
        assert 0 <= r["auc"] <= 1 and 0 <= r["tpr_at_01fpr"] <= r["tpr_at_1fpr"] <= 1
    # the original model trained on the forget set: its samples look more "trained on" than under retrain
    assert by["original"]["mean_score_forget"] > by["retrain"]["mean_score_forget"]
    assert "original" in capsys.readouterr().out
    assert main(["audit", "--run", str(run), "--references", "1"]) == 2
