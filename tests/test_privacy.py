"""Quantizer privacy ranking: the attack-advantage statistic and the ranking of four settings."""

from __future__ import annotations

import numpy as np
import pytest

from edge_qmul import privacy


def test_attack_advantage_is_the_ks_distance_of_the_losses() -> None:
    same = np.linspace(0, 1, 200)
    assert privacy.attack_advantage(same, same) == 0.0
    assert privacy.attack_advantage(np.zeros(50), np.ones(50)) == 1.0  # members all have the lower loss
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 4000), rng.normal(1, 1, 4000)  # KS distance of N(0,1) vs N(1,1) = 0.383
    assert privacy.attack_advantage(a, b) == pytest.approx(0.383, abs=0.03)


def test_ranking_covers_every_setting_with_intervals(digits) -> None:
    members = (digits.train_x[:300], digits.train_y[:300])
    nonmembers = (digits.test_x[:300], digits.test_y[:300])
    scores = privacy.rank(digits.model, digits.calib, members, nonmembers, bootstrap=50)
    assert {s.setting for s in scores} == set(privacy.SETTINGS)
    assert [s.security for s in scores] == sorted((s.security for s in scores), reverse=True)
    by = {s.setting: s for s in scores}
    for s in scores:
        assert 0.0 <= s.security_low <= s.security <= s.security_high <= 1.0 + 1e-9
        assert s.member_loss_mean < s.nonmember_loss_mean  # members are fit better: a real signal
    # int8 per-channel barely changes the model: its leakage stays close to fp32's; 4 bits costs accuracy
    assert abs(by["int8 per-channel"].advantage - by["fp32"].advantage) < 0.1
    assert by["int4 per-channel"].test_accuracy <= by["int8 per-channel"].test_accuracy + 1.0
