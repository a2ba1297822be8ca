"""AdaB2NBatchNorm2d against hand-computed statistics, BatchNorm, and its own checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lightning_forget.nn import AdaB2NBatchNorm2d, ResNet, adab2n_layers, convert_adab2n, revert_adab2n


def _by_hand(x: torch.Tensor, ids: list[int], w: list[float], task: int, renormalize: bool = False):
    """Balanced mean and variance with explicit loops over rows (no vectorised code)."""
    n, c = x.shape[0], x.shape[1]
    counts = [sum(1 for t in ids if t == k) for k in range(task + 1)]
    conc = [torch.tensor(w[k]).exp().item() + counts[k] for k in range(task + 1)]
    if renormalize:
        conc = [a if counts[k] else 0.0 for k, a in enumerate(conc)]
    total = sum(conc)
    s = [conc[ids[i]] / total / counts[ids[i]] for i in range(n)]
    means, variances = [], []
    for ch in range(c):
        mu = sum(s[i] * x[i, ch].mean().item() for i in range(n))
        var = sum(s[i] * ((x[i, ch] - mu) ** 2).mean().item() for i in range(n))
        means.append(mu)
        variances.append(var)
    return torch.tensor(means), torch.tensor(variances), s


def _batch() -> torch.Tensor:
    # five rows, two channels, 1x2 pixels
    return torch.tensor(
        [
            [[[0.0, 2.0]], [[1.0, 1.0]]],
            [[[2.0, 2.0]], [[0.0, -2.0]]],
            [[[3.0, 3.0]], [[3.0, 1.0]]],
            [[[4.0, 4.0]], [[2.0, 2.0]]],
            [[[6.0, 10.0]], [[-1.0, 5.0]]],
        ]
    )


def test_forward_matches_hand_computed_statistics_with_an_absent_task() -> None:
    x = _batch()
    ids = [0, 0, 0, 2, 2]  # task 0 three rows, task 2 two rows, task 1 absent
    layer = AdaB2NBatchNorm2d(2, num_tasks=4, kappa=1.0, affine=False)
    layer.next_task()
    layer.next_task()  # T = 2
    with torch.no_grad():
        layer.task_weight.copy_(torch.tensor([0.0, 0.5, -0.3, 9.0]))
    layer.set_task_ids(torch.tensor(ids))
    out = layer(x)
    mu, var, s = _by_hand(x, ids, [0.0, 0.5, -0.3], task=2)
    # the exact numbers for channel 0: a = (1+3, e^0.5+0, e^-0.3+2); the absent task keeps its mass
    a = [4.0, float(torch.tensor(0.5).exp()), float(torch.tensor(-0.3).exp()) + 2]
    assert s[0] == pytest.approx(a[0] / sum(a) / 3)
    assert sum(s) < 1.0  # official behaviour: the statistics shrink toward 0
    assert mu[0].item() == pytest.approx(a[0] / sum(a) / 3 * (1 + 2 + 3) + a[2] / sum(a) / 2 * (4 + 8))
    expected = (x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    assert torch.allclose(out, expected, atol=1e-5)
    # running statistics: kappa=1 -> eta = 0.1, from (0, 1)
    assert torch.allclose(layer.running_mean, 0.1 * mu, atol=1e-6)
    assert torch.allclose(layer.running_var, 0.9 + 0.1 * var, atol=1e-6)
    # the loss is against the updated running statistics
    loss = ((mu - 0.1 * mu) ** 2).mean() + ((var - (0.9 + 0.1 * var)) ** 2).mean()
    assert layer.stat_loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_renormalize_spreads_the_absent_task_mass() -> None:
    x = _batch()
    ids = [0, 0, 0, 2, 2]
    layer = AdaB2NBatchNorm2d(2, num_tasks=3, kappa=1.0, affine=False, renormalize=True)
    layer.cur_task.fill_(2)
    layer.set_task_ids(torch.tensor(ids))
    layer(x)
    mu, _, s = _by_hand(x, ids, [0.0, 0.0, 0.0], task=2, renormalize=True)
    assert sum(s) == pytest.approx(1.0)
    assert torch.allclose(layer.running_mean, 0.1 * mu, atol=1e-6)


def test_task_zero_and_no_ids_use_plain_biased_statistics() -> None:
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for task, ids in ((0, torch.zeros(6, dtype=torch.long)), (1, None)):
        layer = AdaB2NBatchNorm2d(3, num_tasks=2, kappa=1.0)
        layer.cur_task.fill_(task)
        layer.set_task_ids(ids)
        layer(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        assert torch.allclose(layer.running_mean, 0.1 * mean, atol=1e-6)
        assert torch.allclose(layer.running_var, 0.9 + 0.1 * var, atol=1e-6)


def test_kappa_one_is_batchnorm_up_to_the_unbiased_variance() -> None:
    gen = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(3)
    layer = AdaB2NBatchNorm2d.from_batchnorm(bn, num_tasks=2, kappa=1.0)
    n = 4 * 2 * 3  # rows x pixels
    steps = 6
    for _ in range(steps):
        x = 2.0 + 3.0 * torch.randn(4, 3, 2, 3, generator=gen)
        out_bn, out_ada = bn(x), layer(x)
        assert torch.allclose(out_bn, out_ada, atol=1e-5)  # train outputs use the same batch statistics
    assert torch.allclose(layer.running_mean, bn.running_mean, atol=1e-6)
    decay = 0.9**steps  # what is left of the initial running_var = 1
    ratio = (bn.running_var - decay) / (layer.running_var - decay)
    assert torch.allclose(ratio, torch.full((3,), n / (n - 1)), atol=1e-5)


def test_kappa_zero_is_the_cumulative_average() -> None:
    gen = torch.Generator().manual_seed(2)
    layer = AdaB2NBatchNorm2d(2, num_tasks=1, kappa=0.0)
    means, variances = [], []
    for _ in range(5):
        x = torch.randn(3, 2, 2, 2, generator=gen) + torch.randn(1, generator=gen)
        layer(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        means.append(mean)
        variances.append(var)
    assert torch.allclose(layer.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(layer.running_var, torch.stack(variances).mean(0), atol=1e-6)


def test_the_momentum_recursion() -> None:
    layer = AdaB2NBatchNorm2d(1, num_tasks=1, kappa=0.4, momentum=0.1)
    etas = []
    for _ in range(4):
        layer(torch.randn(2, 1, 1, 1))
        etas.append(float(layer.eta))
    # 1/eta_t = 1 + q / eta_{t-1}, eta_1 = m^kappa, q = (1-m)^kappa
    q = 0.9**0.4
    expected = [0.1**0.4]
    for _ in range(3):
        expected.append(1.0 / (1.0 + q / expected[-1]))
    assert etas == pytest.approx(expected, rel=1e-12)
    assert etas[-1] < etas[0]


def test_conversion_preserves_eval_outputs_and_reverts() -> None:
    torch.manual_seed(0)
    net = ResNet((1, 8, 8), blocks=(1, 1), width=4)
    for _ in range(3):  # give the BN layers non-trivial running statistics
        net(torch.randn(4, 1, 8, 8))
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    before = net(x)
    names = [n for n, m in net.named_modules() if type(m) is nn.BatchNorm2d]
    converted = convert_adab2n(copy.deepcopy(net), num_tasks=3, kappa=0.5)
    layers = adab2n_layers(converted)
    assert len(layers) == len(names) and not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert all(not m.training for m in layers)
    assert torch.allclose(converted(x), before, atol=1e-6)
    back = revert_adab2n(converted)
    assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == len(names)
    assert torch.allclose(back(x), before, atol=1e-6)


def test_gradient_reaches_the_task_weights() -> None:
    layer = AdaB2NBatchNorm2d(2, num_tasks=3, kappa=0.7)
    layer.next_task()
    layer.set_task_ids(torch.tensor([0, 1, 1, 1]))
    x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = layer(x)
    (out.pow(3).sum() + layer.stat_loss).backward()
    grad = layer.task_weight.grad
    assert grad is not None and bool((grad[:2].abs() > 0).all())
    assert grad[2] == 0  # a task not yet seen gets no gradient
    assert x.grad is not None


def test_state_dict_round_trip_continues_the_recursion() -> None:
    gen = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 2, 2, 2, generator=gen) for _ in range(6)]
    layer = AdaB2NBatchNorm2d(2, num_tasks=2, kappa=0.4)
    for x in batches[:3]:
        layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {"eta", "cur_task", "num_batches_tracked", "task_weight"} <= set(state)
    restored = AdaB2NBatchNorm2d(2, num_tasks=2, kappa=0.4)
    restored.load_state_dict(state)
    fresh = AdaB2NBatchNorm2d(2, num_tasks=2, kappa=0.4)
    fresh.load_state_dict({k: v for k, v in state.items() if k != "eta"}, strict=False)  # eta lost
    for x in batches[3:]:
        layer(x)
        restored(x)
        fresh(x)
    assert torch.equal(layer.running_mean, restored.running_mean)
    assert float(layer.eta) == float(restored.eta)
    assert not torch.allclose(layer.running_mean, fresh.running_mean)  # the buffer matters


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="kappa"):
        AdaB2NBatchNorm2d(2, 2, kappa=1.5)
    with pytest.raises(ValueError, match="momentum"):
        AdaB2NBatchNorm2d(2, 2, kappa=0.5, momentum=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="track_running_stats"):
        AdaB2NBatchNorm2d.from_batchnorm(nn.BatchNorm2d(2, track_running_stats=False), 2, 0.5)
    layer = AdaB2NBatchNorm2d(2, num_tasks=2, kappa=0.5)
    layer.next_task()
    layer.set_task_ids(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 1\]"):
        layer(torch.randn(2, 2, 1, 1))
    layer.set_task_ids(torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="3"):
        layer(torch.randn(2, 2, 1, 1))
    layer.next_task()  # the stream has ended: a fine-tuning at its end balances over every task seen
    layer.set_task_ids(torch.tensor([0, 1]))
    layer(torch.randn(2, 2, 1, 1))
    layer.set_task_ids(torch.tensor([0, 2]))  # rows of a third task
    with pytest.raises(RuntimeError, match="num_tasks=2"):
        layer(torch.randn(2, 2, 1, 1))
    layer.next_task()
    layer.set_task_ids(torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="num_tasks"):
        layer(torch.randn(2, 2, 1, 1))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(2, 2))


def test_finetuning_freeze_treats_it_as_a_plain_module() -> None:
    from lightning.pytorch.callbacks import BaseFinetuning

    for train_bn in (True, False):
        net = convert_adab2n(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)), num_tasks=2, kappa=0.5)
        BaseFinetuning.freeze(net, train_bn=train_bn)
        layer = adab2n_layers(net)[0]
        # not a _BatchNorm: frozen either way, and it keeps tracking running statistics
        assert not any(p.requires_grad for p in layer.parameters())
        assert layer.track_running_stats
        net.train()
        net(torch.randn(3, 1, 2, 2))
        assert int(layer.num_batches_tracked) == 1
    layer.track_running_stats = False
    net(torch.randn(3, 1, 2, 2))
    assert int(layer.num_batches_tracked) == 1


def _autograd_reference(layer: AdaB2NBatchNorm2d, x: torch.Tensor, ids, eta: float):
    """The training forward composed from differentiable torch ops (autograd does the backward);
    returns the output, the statistics loss and the updated running statistics."""
    task = int(layer.cur_task)
    if ids is None or task == 0:
        s = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype) + 0.0 * layer.task_weight.sum()
    else:
        ids = torch.as_tensor(ids)
        counts = torch.bincount(ids, minlength=task + 1).to(x.dtype)
        a = layer.task_weight[: task + 1].exp() + counts
        if layer.renormalize:
            a = a * (counts > 0)
        pi = a / a.sum()
        s = pi[ids] / counts[ids]
    mean = (s.view(-1, 1) * x.mean(dim=(2, 3))).sum(0)
    var = (s.view(-1, 1) * (x - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(2, 3))).sum(0)
    out = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + layer.eps)
    if layer.affine:
        out = out * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    rm = (1 - eta) * layer.running_mean + eta * mean.detach()
    rv = (1 - eta) * layer.running_var + eta * var.detach()
    loss = ((mean - rm) ** 2).mean() + ((var - rv) ** 2).mean()
    return out, loss, rm, rv


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("task,ids", [(0, None), (2, [0, 0, 2, 2, 2, 0]), (3, [3, 1, 1, 3, 3, 3])])
def test_hand_written_backward_equals_autograd_through_the_formulas(affine, renormalize, task, ids) -> None:
    # The layer's training forward is one autograd node with a hand-written backward (speed);
    # it must give autograd's gradients for the input, the task weights and the affine parameters.
    gen = torch.Generator().manual_seed(task + 10 * affine + 100 * renormalize)
    layer = AdaB2NBatchNorm2d(3, num_tasks=5, kappa=0.4, affine=affine, renormalize=renormalize).double()
    with torch.no_grad():
        layer.task_weight.copy_(torch.randn(5, generator=gen))
        layer.running_mean.copy_(torch.randn(3, generator=gen))
        if affine:
            layer.weight.copy_(torch.randn(3, generator=gen))
            layer.bias.copy_(torch.randn(3, generator=gen))
    layer.cur_task.fill_(task)
    reference = copy.deepcopy(layer)
    x = (3 * torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    g = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64)
    layer.set_task_ids(None if ids is None else torch.tensor(ids))
    out = layer(x)
    eta = float(layer.eta)  # the first step: m^kappa
    assert eta == pytest.approx(0.1**0.4)
    ref_out, ref_loss, ref_mean, ref_var = _autograd_reference(reference, x, ids, eta)
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.allclose(layer.stat_loss, ref_loss, atol=1e-12)
    assert torch.allclose(layer.running_mean, ref_mean, atol=1e-12)
    assert torch.allclose(layer.running_var, ref_var, atol=1e-12)
    for weight in (0.0, 0.7):  # with and without the statistics loss in the objective
        params = [layer.task_weight] + ([layer.weight, layer.bias] if affine else [])
        ref_params = [reference.task_weight] + ([reference.weight, reference.bias] if affine else [])
        grads = torch.autograd.grad((out * g).sum() + weight * layer.stat_loss, [x, *params], retain_graph=True)
        expected = torch.autograd.grad((ref_out * g).sum() + weight * ref_loss, [x, *ref_params], retain_graph=True)
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want, atol=1e-10), (got, want)
    if ids is not None:
        assert bool((grads[1][: task + 1] != 0).any()) and bool((grads[1][task + 1 :] == 0).all())


def test_backward_passes_gradcheck() -> None:
    layer = AdaB2NBatchNorm2d(2, num_tasks=3, kappa=0.7).double()
    layer.track_running_stats = False  # the same function at every evaluation
    layer.next_task()
    layer.next_task()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -0.2]))
        layer.task_weight.copy_(torch.tensor([0.1, -0.4, 0.2]))
        layer.weight.copy_(torch.tensor([1.5, 0.5]))
    ids = torch.tensor([0, 2, 2, 0, 2])

    def f(x):
        layer.set_task_ids(ids)
        return layer(x), layer.stat_loss

    x = torch.randn(5, 2, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    # numerical against analytical input gradients (the parameters' are checked against autograd above)
    assert torch.autograd.gradcheck(f, (x,))
