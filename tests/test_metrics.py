import numpy as np
import pytest
import torch

from edge_qmul.metrics import EvalSets, accuracy, avg_gap, evaluate_model, mia_efficacy, true_label_confidence

rng = np.random.default_rng(0)
# Members are fit confidently (near 1); unseen samples spread lower.
MEMBERS = rng.beta(40, 1, size=(500, 1))
NONMEMBERS = rng.beta(4, 2, size=(500, 1))


def test_mia_memorised_forget_set_looks_like_members() -> None:
    memorised = rng.beta(40, 1, size=(300, 1))
    assert mia_efficacy(MEMBERS, NONMEMBERS, memorised) < 10.0


def test_mia_never_seen_forget_set_looks_like_non_members() -> None:
    unseen = rng.beta(4, 2, size=(300, 1))
    assert mia_efficacy(MEMBERS, NONMEMBERS, unseen) > 70.0


def test_mia_orders_models_by_how_much_they_forgot() -> None:
    scores = [mia_efficacy(MEMBERS, NONMEMBERS, rng.beta(a, 1, size=(300, 1))) for a in (40, 10, 3)]
    assert scores == sorted(scores)


def test_avg_gap() -> None:
    ref = {"FA": 90.0, "RA": 99.0, "TA": 91.0, "MIA": 10.0}
    assert avg_gap({"FA": 94.0, "RA": 98.0, "TA": 91.0, "MIA": 13.0}, ref) == pytest.approx(2.0)
    assert avg_gap(ref, ref) == 0.0


def test_accuracy_and_confidence() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    assert accuracy(logits, y) == pytest.approx(200 / 3)
    conf = true_label_confidence(logits, y)
    assert conf.shape == (3, 1)
    assert conf[0, 0] == pytest.approx(float(torch.softmax(logits[0], 0)[0]))


def test_evaluate_model_on_a_perfect_lookup_model() -> None:
    # A "model" that returns confident correct logits for members and forget, uniform for test.
    x = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1)
    y = torch.arange(30) % 3

    def model(batch: torch.Tensor) -> torch.Tensor:
        idx = batch.view(-1).long()
        out = torch.zeros(len(idx), 3)
        seen = idx < 20
        out[seen, y[idx[seen]]] = 10.0
        return out

    sets = EvalSets(x[:5], y[:5], x[5:20], y[5:20], x[20:], y[20:])
    m = evaluate_model(model, sets)
    assert m["FA"] == 100.0 and m["RA"] == 100.0
    assert m["MIA"] == 0.0  # forget samples look exactly like members


def test_loss_attack_separates_memorised_from_unseen() -> None:
    from edge_qmul.metrics import loss_attack

    rng = np.random.default_rng(1)
    unseen = rng.exponential(1.0, 2000)
    memorised = rng.exponential(0.05, 500)
    strong = loss_attack(memorised, unseen, bootstrap=50)
    assert strong["auc"] > 0.9 and strong["tpr_at_1fpr"] > 0.05
    assert strong["auc_low"] <= strong["auc"] <= strong["auc_high"]
    same = loss_attack(rng.exponential(1.0, 500), unseen, bootstrap=50)
    assert abs(same["auc"] - 0.5) < 0.05
    assert same["auc_low"] < 0.5 < same["auc_high"] or abs(same["auc"] - 0.5) < 0.03


def test_fast_auc_equals_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    from edge_qmul.metrics import auc_low_loss_is_member, loss_attack

    rng = np.random.default_rng(3)
    forget, test = rng.integers(0, 40, 300).astype(float), rng.integers(0, 50, 1000).astype(float)
    y = np.concatenate([np.ones(300), np.zeros(1000)])
    assert auc_low_loss_is_member(forget, np.sort(test)) == pytest.approx(roc_auc_score(y, -np.r_[forget, test]))
    a = loss_attack(forget, test, bootstrap=100)
    assert a["auc_low"] <= a["auc"] <= a["auc_high"]


@pytest.mark.parametrize("n_forget", [20, 200, 2000])
def test_null_standard_errors_match_simulated_forgotten_sets(n_forget: int) -> None:
    """A forget set the model treats exactly like unseen data: FA − TA and the loss-attack AUC scatter
    around 0 and 0.5 with the standard errors the validation uses to decide whether a check is conclusive."""
    from edge_qmul.evidence import accuracy_gap_null_se, auc_null_se
    from edge_qmul.metrics import auc_low_loss_is_member

    rng = np.random.default_rng(n_forget)
    p, n_test, draws = 0.92, 10_000, 2000
    gaps = 100.0 * (rng.binomial(n_forget, p, draws) / n_forget - rng.binomial(n_test, p, draws) / n_test)
    assert np.std(gaps) == pytest.approx(accuracy_gap_null_se(p, n_forget, n_test), rel=0.1)
    test_sorted = np.sort(rng.exponential(1.0, n_test))
    aucs = [auc_low_loss_is_member(rng.exponential(1.0, n_forget), test_sorted) for _ in range(400)]
    assert np.std(aucs) == pytest.approx(auc_null_se(n_forget, n_test), rel=0.15)
