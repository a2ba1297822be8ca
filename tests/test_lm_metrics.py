"""Language-model unlearning metrics (open-unlearning's definitions) against hand values, scipy and scikit-learn."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from lightning_forget.metrics import functional_lm as M

# two samples, three aligned positions, vocabulary 3; sample 0 answers at positions 1, 2, sample 1 at 0, 1, 2
PROBS = torch.tensor([
    [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]],
    [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]],
], dtype=torch.float64)
LOGITS = PROBS.log()
LABELS = torch.tensor([[-100, 1, 2], [0, 1, 1]])


def test_probability_and_average_nll_by_hand() -> None:
    nll0 = -(math.log(0.6) + math.log(0.1)) / 2
    nll1 = -(math.log(0.5) + math.log(0.2) + math.log(0.8)) / 3
    assert M.average_nll(LOGITS, LABELS).tolist() == pytest.approx([nll0, nll1])
    assert M.answer_probability(LOGITS, LABELS).tolist() == pytest.approx([math.sqrt(0.06), (0.08) ** (1 / 3)])
    assert M.loss_score(M.average_nll(LOGITS, LABELS)).tolist() == pytest.approx([nll0, nll1])


def test_exact_memorization_and_extraction_strength_by_hand() -> None:
    # argmax: sample 0 -> [2, 1, 0] at positions 0..2; answer positions 1, 2 predict 1, 0 vs labels 1, 2
    # sample 1 -> [0, 2, 1] vs labels [0, 1, 1]
    assert M.exact_memorization(LOGITS, LABELS).tolist() == pytest.approx([0.5, 2 / 3])
    # sample 0: suffix from 0 ([1,0] vs [1,2]) fails, from 1 ([0] vs [2]) fails -> k stays n-1 = 1: 1 - 1/2
    # sample 1: suffix [0,2,1]≠[0,1,1], [2,1]≠[1,1], [1]=[1] -> k = 2: 1 - 2/3
    assert M.extraction_strength(LOGITS, LABELS).tolist() == pytest.approx([0.5, 1 / 3])
    perfect = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2]]), 3).double() * 10
    assert M.extraction_strength(perfect, torch.tensor([[0, 1, 2]])).tolist() == [1.0]


def test_min_k_and_min_k_plus_plus_against_their_formulas() -> None:
    lp1 = sorted([math.log(0.5), math.log(0.2), math.log(0.8)])
    # k = 0.4: sample 0 (n=2) -> max(1, 0) = 1 token; sample 1 (n=3) -> 1 token
    assert M.min_k_score(LOGITS, LABELS, k=0.4).tolist() == pytest.approx([-math.log(0.1), -lp1[0]])
    assert M.min_k_score(LOGITS, LABELS, k=1.0)[1].item() == pytest.approx(-sum(lp1) / 3)

    def z(p: list[float], label: int) -> float:
        mu = sum(q * math.log(q) for q in p)
        var = max(sum(q * math.log(q) ** 2 for q in p) - mu**2, 1e-6)
        return (math.log(p[label]) - mu) / math.sqrt(var)

    z0 = sorted([z([0.1, 0.6, 0.3], 1), z([0.7, 0.2, 0.1], 2)])
    z1 = sorted([z([0.5, 0.25, 0.25], 0), z([0.2, 0.2, 0.6], 1), z([0.1, 0.8, 0.1], 1)])
    assert M.min_k_plus_plus_score(LOGITS, LABELS, k=0.4).tolist() == pytest.approx([-z0[0], -z1[0]])
    assert M.min_k_plus_plus_score(LOGITS, LABELS, k=0.7).tolist() == pytest.approx([-z0[0], -(z1[0] + z1[1]) / 2])
    with pytest.raises(ValueError, match="k must be"):
        M.min_k_score(LOGITS, LABELS, k=0.0)


def test_zlib_reference_auc_and_privacy_leakage() -> None:
    nll = torch.tensor([2.0, 3.0], dtype=torch.float64)
    texts = ["Paris", "the the the the the the"]
    expected = [2.0 / len(zlib.compress(b"Paris")), 3.0 / len(zlib.compress(texts[1].encode()))]
    assert M.zlib_score(nll, texts).tolist() == pytest.approx(expected)
    assert M.reference_score(nll, torch.tensor([1.5, 3.5])).tolist() == pytest.approx([0.5, -0.5])
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    forget, holdout = rng.normal(1.0, 1.0, 37), rng.normal(1.5, 1.0, 23)
    forget[:5] = holdout[:5]  # ties
    expected_auc = roc_auc_score([0] * 37 + [1] * 23, np.concatenate([forget, holdout]))
    assert M.membership_auc(torch.tensor(forget), torch.tensor(holdout)) == pytest.approx(expected_auc, abs=1e-12)
    assert M.privacy_leakage(0.8, 0.6) == pytest.approx((0.2 - 0.4) / 0.4 * 100, rel=1e-6)
    assert M.privacy_leakage(0.5) == pytest.approx(0.0, abs=1e-6)


def test_truth_ratio_forget_quality_and_model_utility() -> None:
    correct = torch.tensor([1.0, 2.0], dtype=torch.float64)
    wrong = torch.tensor([[2.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    tr = M.truth_ratio(correct, wrong)
    expected = [math.exp(-3.0) / math.exp(-1.0), math.exp(-1.0) / math.exp(-2.0)]
    assert tr.tolist() == pytest.approx(expected, rel=1e-8)
    assert M.truth_ratio_score(tr, "closer_to_1_better") == pytest.approx((expected[0] + 1 / expected[1]) / 2, rel=1e-8)
    assert M.truth_ratio_score(tr, "true_better") == pytest.approx((1 - expected[0] + 0) / 2, rel=1e-8)
    with pytest.raises(ValueError, match="aggregator"):
        M.truth_ratio_score(tr, "mean")  # type: ignore[arg-type]
    p = M.normalised_probability(torch.tensor([0.5, 0.2]), torch.tensor([[0.1, 0.4], [0.2, 0.0]]))
    assert p.tolist() == pytest.approx([0.5, 0.5], rel=1e-6)

    from scipy.stats import hmean, ks_2samp

    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 2, 40), rng.uniform(0.3, 2.5, 30)
    assert M.forget_quality(torch.tensor(a), torch.tensor(b)) == pytest.approx(ks_2samp(a, b).pvalue, rel=1e-12)
    scores = [0.4, 0.9, 0.7, 0.55]
    assert M.model_utility(scores) == pytest.approx(float(hmean(scores)), rel=1e-12)
    assert M.model_utility([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="model_utility"):
        M.model_utility([0.5, -0.1])


def test_rouge_l_recall_worked_example_and_torchmetrics() -> None:
    # reference tokens: the cat sat on the mat (6); prediction: a cat was sitting on a mat
    # LCS = cat, on, mat = 3 -> recall 3/6
    assert M.rouge_l_recall("A cat was sitting on a mat.", "The cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l_recall("anything", "") == 0.0
    assert M.rouge_l_recall("Born in 1952, in Oslo!", "born in oslo in 1952") == pytest.approx(3 / 5)
    from torchmetrics.functional.text.rouge import rouge_score

    for pred, ref in [("the quick brown fox jumps", "a quick fox jumped over the brown dog"),
                      ("Alice Moreau wrote 'Glass Rivers' in 1987.", "Alice Moreau's novel Glass Rivers (1987)")]:
        tm = float(rouge_score(pred, ref, use_stemmer=False, rouge_keys=("rougeL",))["rougeL_recall"])
        assert M.rouge_l_recall(pred, ref) == pytest.approx(tm, abs=1e-6)


def test_deduplicate_by_index_drops_distributed_sampler_padding() -> None:
    indices = torch.tensor([4, 0, 2, 1, 3, 4, 0])  # 5 samples on 2 ranks: two repeated to pad
    values = torch.tensor([40.0, 0.0, 20.0, 10.0, 30.0, 40.0, 0.0])
    unique, kept = M.deduplicate_by_index(indices, values)
    assert unique.tolist() == [0, 1, 2, 3, 4] and kept.tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_metrics_reject_samples_without_answer_tokens() -> None:
    with pytest.raises(ValueError, match="answer token"):
        M.average_nll(LOGITS, torch.tensor([[-100, -100, -100], [0, 1, 1]]))
