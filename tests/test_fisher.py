"""fisher_diagonal against a per-sample autograd loop written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_forget.fisher import fisher_diagonal


def _model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 7)]
    if bn:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers)


def _data(n: int = 10, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _reference(model: nn.Module, batches, weighted: bool = True, limit: int | None = None) -> dict[str, torch.Tensor]:
    """One sample at a time with autograd, in eval mode."""
    model.eval()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in named.items()}
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            if limit is not None and count >= limit:
                break
            log_p = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0, y[i]]
            grads = torch.autograd.grad(log_p, list(named.values()))
            w = log_p.exp().detach() if weighted else 1.0
            for (n, _), g in zip(named.items(), grads):
                total[n] += w * g**2
            count += 1
    model.train()
    return {n: t / count for n, t in total.items()}


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("bn", [False, True])
def test_matches_per_sample_loop(bn: bool, vectorized: bool) -> None:
    model = _model(bn)
    if bn:  # non-trivial running statistics
        with torch.no_grad():
            model.train()
            model(torch.randn(32, 5) * 2 + 1)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    got = fisher_diagonal(model, _data(), progress=False, vectorized=vectorized)
    assert model.training  # mode restored
    for n, b in model.named_buffers():  # eval mode: running statistics untouched
        assert torch.equal(b, buffers[n]), n
    want = _reference(model, _data())
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n
        assert got[n].abs().sum() > 0


def test_empirical_and_sample_cap() -> None:
    model = _model()
    got = fisher_diagonal(model, _data(), loss="empirical", max_samples=6, progress=False)
    want = _reference(model, _data(), weighted=False, limit=6)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n
    weighted = fisher_diagonal(model, _data(), max_samples=6, progress=False)
    assert not torch.allclose(weighted["0.weight"], got["0.weight"])


def test_frozen_parameters_are_skipped_and_used() -> None:
    model = _model()
    model[0].weight.requires_grad_(False)
    got = fisher_diagonal(model, _data(), progress=False)
    assert "0.weight" not in got and "0.bias" in got
    want = _reference(model, _data())
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n


def test_dict_output_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    model = DictModel()
    got = fisher_diagonal(model, _data(), progress=True)
    want = _reference(model.net, _data())
    assert torch.allclose(got["net.2.weight"], want["2.weight"], atol=1e-6)
    assert "Fisher" in capsys.readouterr().err


def test_bad_inputs() -> None:
    model = _model()
    with pytest.raises(ValueError, match="loss"):
        fisher_diagonal(model, _data(), loss="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_samples"):
        fisher_diagonal(model, _data(), max_samples=0)
    with pytest.raises(TypeError, match="batches"):
        fisher_diagonal(model, [{"x": torch.zeros(2, 5)}], progress=False)
    with pytest.raises(ValueError, match="no sample"):
        fisher_diagonal(model, [], progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        fisher_diagonal(model, _data(), progress=False)
