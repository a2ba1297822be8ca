"""Unlearning metrics: H-mean, AUC (against scikit-learn), MIA-efficacy, state merging."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from lightning_forget.metrics import (
    ForgetRetainAccuracy,
    MembershipInference,
    h_mean,
    membership_scores,
    mia_auc,
    mia_efficacy,
    roc_auc,
)


def test_h_mean_formula_and_paper_check():
    # Drop = 0.8 - 0.1 = 0.7, Acc_r = 0.9: 2*0.7*0.9/1.6
    assert h_mean(0.8, 0.1, 0.9) == pytest.approx(2 * 0.7 * 0.9 / 1.6)
    # GS-LoRA Table 2, 100-5: Acc_f 70.88 -> 0, Acc_r 71.16 gives H = 71.02
    assert h_mean(70.88, 0.0, 71.16) == pytest.approx(71.02, abs=0.01)
    assert h_mean(0.5, 0.5, 0.0) == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_sklearn(ties):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(37, generator=g) + 0.5
    neg = torch.randn(53, generator=g)
    if ties:
        pos, neg = pos.round(), neg.round()
    labels = [1] * len(pos) + [0] * len(neg)
    expected = roc_auc_score(labels, torch.cat([pos, neg]).numpy())
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert mia_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_empty_set_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one positive"):
        roc_auc(torch.zeros(0), torch.ones(3))


def test_membership_scores():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    loss = membership_scores(logits, y, "loss")
    assert torch.allclose(loss, -torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    conf = membership_scores(logits, y, "confidence")
    assert torch.allclose(conf, torch.softmax(logits, 1)[:, 0])
    with pytest.raises(ValueError, match="kind"):
        membership_scores(logits, y, "entropy")


def test_mia_efficacy_by_hand():
    retain = torch.tensor([0.9, 0.8, 0.7])  # members score high
    heldout = torch.tensor([0.1, 0.2, 0.3])
    # best threshold separates them perfectly: t = 0.7 (score >= 0.7 is a member)
    forget = torch.tensor([0.95, 0.5, 0.05, 0.2])
    assert mia_efficacy(forget, retain, heldout) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="forget_scores"):
        mia_efficacy(torch.zeros(0), retain, heldout)


def test_forget_retain_accuracy_and_merged_states():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 6, generator=g)
    y = torch.randint(0, 6, (200,), generator=g)
    whole, a, b = ForgetRetainAccuracy(6), ForgetRetainAccuracy(6), ForgetRetainAccuracy(6)
    whole.update(logits, y)
    a.update(logits[:120], y[:120])
    b.update(logits[120:], y[120:])
    a.merge_state(b)  # what the DDP sum-reduction does with two ranks' states
    pred = logits.argmax(1)
    for metric in (whole, a):
        metric.forget_classes, metric.old_classes, metric.acc_f_before = [2, 3], [0], 0.9
        out = metric.compute()
        f = torch.isin(y, torch.tensor([2, 3]))
        o = y == 0
        r = ~(f | o)
        assert out["acc_f"] == pytest.approx((pred[f] == y[f]).float().mean().item())
        assert out["acc_o"] == pytest.approx((pred[o] == y[o]).float().mean().item())
        assert out["acc_r"] == pytest.approx((pred[r] == y[r]).float().mean().item())
        assert out["h_mean"] == pytest.approx(h_mean(0.9, out["acc_f"], out["acc_r"]))
    assert torch.equal(whole.correct, a.correct) and torch.equal(whole.total, a.total)
    assert math.isnan(ForgetRetainAccuracy(3).accuracy_of([1]))
    with pytest.raises(ValueError, match="num_classes"):
        ForgetRetainAccuracy(0)


def test_membership_inference_metric_merges_and_matches_functions():
    g = torch.Generator().manual_seed(2)
    data = {s: (torch.randn(30, 4, generator=g) * (3 if s == "retain" else 1), torch.randint(0, 4, (30,), generator=g))
            for s in ("forget", "retain", "heldout")}
    whole, a, b = MembershipInference(), MembershipInference(), MembershipInference()
    for split, (logits, y) in data.items():
        whole.update(logits, y, split)
        a.update(logits[:10], y[:10], split)
        b.update(logits[10:], y[10:], split)
    a.merge_state(b)
    scores = {s: membership_scores(*data[s]) for s in data}
    expected = {"auc": mia_auc(scores["forget"], scores["heldout"]),
                "efficacy": mia_efficacy(scores["forget"], scores["retain"], scores["heldout"])}
    assert whole.compute() == pytest.approx(expected)
    assert a.compute() == pytest.approx(expected)
    with pytest.raises(ValueError, match="split"):
        whole.update(*data["forget"], "train")
    with pytest.raises(ValueError, match="score"):
        MembershipInference(score="margin")
