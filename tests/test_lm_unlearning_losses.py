"""Token-level unlearning losses (NPO, SimNPO, DPO/IdkPO, RMU) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_forget.unlearning import losses as L


def _logits_for(probs: list[list[list[float]]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log-probabilities are logits)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# two samples, three positions, vocabulary of two; sample 0 answers at positions 1, 2; sample 1 at 2
PROBS = [[[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], [[0.3, 0.7], [0.6, 0.4], [0.25, 0.75]]]
LABELS = torch.tensor([[-100, 1, 0], [-100, -100, 1]])


def test_sequence_log_prob_sums_answer_tokens_only() -> None:
    logits = _logits_for(PROBS)
    expected = torch.tensor([math.log(0.8) + math.log(0.9), math.log(0.75)], dtype=torch.float64)
    assert torch.allclose(L.sequence_log_prob(logits, LABELS).double(), expected, atol=1e-6)
    assert L.answer_lengths(LABELS).tolist() == [2, 1]
    per_token, mask = L.token_log_probs(logits, LABELS)
    assert mask.tolist() == [[False, True, True], [False, False, True]]
    assert float(per_token[0, 0]) == 0.0 and float(per_token[1, 1]) == 0.0


def test_npo_simnpo_dpo_against_hand_values() -> None:
    lp = torch.tensor([-2.0, -5.0])
    ref = torch.tensor([-1.0, -6.0])
    beta = 0.1
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    # NPO: -(2/β)·mean log σ(-β(lp - ref))
    npo = -(2 / beta) * 0.5 * (math.log(sig(-beta * -1.0)) + math.log(sig(-beta * 1.0)))
    assert float(L.npo_loss(lp, ref, beta)) == pytest.approx(npo, rel=1e-6)
    # SimNPO: x = NLL/|y| - δ, -(2/β)·mean log σ(β x)
    lengths = torch.tensor([2, 5])
    b, d = 4.5, 0.25
    xs = [2.0 / 2 - d, 5.0 / 5 - d]
    simnpo = -(2 / b) * sum(math.log(sig(b * x)) for x in xs) / 2
    assert float(L.simnpo_loss(lp, lengths, beta=b, delta=d)) == pytest.approx(simnpo, rel=1e-6)
    # DPO with chosen = "I don't know", rejected = the forget answer
    chosen, rejected = torch.tensor([-3.0]), torch.tensor([-1.0])
    ref_c, ref_r = torch.tensor([-4.0]), torch.tensor([-1.5])
    margin = (-3.0 + 4.0) - (-1.0 + 1.5)
    assert float(L.dpo_loss(chosen, rejected, ref_c, ref_r, beta)) == pytest.approx(
        -(2 / beta) * math.log(sig(beta * margin)), rel=1e-6)
    # at θ = ref NPO is (2/β)·log 2 whatever the data
    assert float(L.npo_loss(lp, lp, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_gradient_tends_to_gradient_ascent_as_beta_goes_to_zero() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]])
    reference = L.sequence_log_prob(logits.detach() + 0.3 * torch.randn(2, 4, 5, dtype=torch.float64), labels)
    (g_npo,) = torch.autograd.grad(L.npo_loss(L.sequence_log_prob(logits, labels), reference, beta=1e-6), logits)
    # GA on the summed NLL, meaned over samples: the token-mean GA up to the answer-length factor
    (g_ga,) = torch.autograd.grad(L.sequence_log_prob(logits, labels).mean(), logits)
    assert torch.allclose(g_npo, g_ga, atol=1e-6)
    (g_tok,) = torch.autograd.grad(L.gradient_ascent_loss(logits, labels), logits)
    # sum-of-NLL meaned over samples = (tokens / B) · token-mean NLL: 5 answer tokens over 2 samples
    assert torch.allclose(g_ga, 2.5 * g_tok, atol=1e-6)
    # at a large β the gradient is damped on samples already unlikely (NPO's point), so it differs
    (g_big,) = torch.autograd.grad(L.npo_loss(L.sequence_log_prob(logits, labels), reference - 50, beta=1.0), logits)
    assert not torch.allclose(g_big, g_ga, atol=1e-3)


def test_simnpo_gradient_on_a_tiny_model_matches_the_formula() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    labels = torch.tensor([[-100, 2, 1]])
    lp = L.sequence_log_prob(logits, labels)
    loss = L.simnpo_loss(lp, L.answer_lengths(labels), beta=4.5)
    (g,) = torch.autograd.grad(loss, logits)
    # chain rule by hand: d/dx [-(2/β) log σ(βx)] = -2·(1 - σ(βx)), and dx/dlp = -1/n with x = -lp/n
    x = float(-lp.detach() / 2)
    dloss_dlp = -2 * (1 - 1 / (1 + math.exp(-4.5 * x))) * (-1 / 2)
    (g_lp,) = torch.autograd.grad(L.sequence_log_prob(logits, labels).sum(), logits)
    assert torch.allclose(g, dloss_dlp * g_lp, atol=1e-6)
    assert dloss_dlp > 0  # descending the loss lowers the answer's log-probability


def test_rmu_control_vector_and_activation_loss() -> None:
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    c1, c2 = L.rmu_control_vector(6, 2.0, g1), L.rmu_control_vector(6, 2.0, g2)
    assert torch.equal(c1, c2) and c1.shape == (1, 1, 6)
    assert float(c1.norm()) == pytest.approx(2.0) and bool((c1 >= 0).all())  # uniform, not Gaussian
    # hand: two samples, d = 2; sample 0 counts positions 0, 1; sample 1 position 1
    h = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [9.0, 9.0]], [[5.0, 5.0], [2.0, 4.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0]]])
    labels = torch.tensor([[5, 6, -100], [-100, 7, -100]])
    s0 = ((0 + 4) / 2 + (1 + 1) / 2) / 2  # mean over d, summed over counted positions, / count
    s1 = ((1 + 9) / 2) / 1
    assert float(L.activation_mse(h, target, labels)) == pytest.approx((s0 + s1) / 2)
    h_ref = h + 1.0
    total = L.rmu_loss(h, target, labels, h, h_ref, labels, gamma=1.0, alpha=3.0)
    assert float(total) == pytest.approx((s0 + s1) / 2 + 3.0 * 1.0)
    with pytest.raises(ValueError, match="activation_mse"):
        L.activation_mse(h, target, labels[:, :2])


def test_rmu_loss_steers_a_tiny_model_layer_toward_the_control_vector() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    labels = torch.tensor([[-100, 1, 1], [-100, 1, -100]])
    control = L.rmu_control_vector(4, 2.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = float(L.activation_mse(layer(x), control, labels))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        L.activation_mse(layer(x), control, labels).backward()
        opt.step()
    with torch.no_grad():
        assert float(L.activation_mse(layer(x), control, labels)) < 0.1 * before


def test_token_losses_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        L.npo_loss(torch.zeros(1), torch.zeros(1), beta=0.0)
    with pytest.raises(ValueError, match="answer token"):
        L.simnpo_loss(torch.zeros(2), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="do not match"):
        L.sequence_log_prob(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size"):
        L.rmu_control_vector(0, 1.0)


def test_graddiff_token_level_is_the_classifier_function() -> None:
    # one implementation serves both: token-level GA is -CE over the answer tokens (HF's token mean)
    logits = _logits_for(PROBS)
    expected = -(-(math.log(0.8) + math.log(0.9) + math.log(0.75)) / 3)
    assert float(L.gradient_ascent_loss(logits, LABELS)) == pytest.approx(expected, rel=1e-6)
    retain = torch.tensor(0.5, dtype=torch.float64)
    assert float(L.graddiff_loss(logits, LABELS, retain, gamma=1.0, alpha=2.0)) == pytest.approx(expected + 1.0)
