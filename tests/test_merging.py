"""Tests of lightning_forget.merging (pure functions) and the merge CLI."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from lightning_forget import merging
from lightning_forget.merging import (
    block_depths,
    lines_scale,
    lines_scales,
    merge,
    norm_ratio_alpha,
    task_arithmetic,
    task_vector,
    ties_merge,
)

logging.getLogger("transformers").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------- λ formula
@pytest.mark.parametrize("num_blocks", [1, 2, 4, 12])
@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 0.9), (0.3, 0.5), (0.0, 1.5)])
def test_lines_scales_formula(num_blocks: int, alpha: float, beta: float) -> None:
    scales = lines_scales(num_blocks, alpha, beta)
    assert len(scales) == num_blocks
    if num_blocks == 1:
        assert scales == [pytest.approx(alpha + beta)]
        return
    for ell in range(1, num_blocks + 1):  # block ℓ = 1..L: λ(ℓ) = α + β·(ℓ−1)/(L−1)
        assert scales[ell - 1] == pytest.approx(alpha + beta * (ell - 1) / (num_blocks - 1))
    assert scales[0] == pytest.approx(alpha) and scales[-1] == pytest.approx(alpha + beta)


def test_lines_scales_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        lines_scales(0, 0.1, 0.9)
    with pytest.raises(ValueError, match="alpha"):
        lines_scales(3, float("nan"), 0.9)
    with pytest.raises(TypeError, match="beta"):  # a wrong type is a TypeError (validation.py's rule)
        lines_scales(3, 0.1, "x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- depth discovery
def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_depth_gpt2() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    depths, num = block_depths(_names(model))
    assert num == 3
    assert depths["transformer.h.2.mlp.c_fc.weight"] == 2
    assert depths["transformer.h.0.ln_1.weight"] == 0
    assert depths["transformer.wte.weight"] is None and depths["transformer.ln_f.weight"] is None


def test_depth_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2, vocab_size=40)
    depths, num = block_depths(_names(LlamaForCausalLM(config)))
    assert num == 3
    assert depths["model.layers.1.mlp.down_proj.weight"] == 1
    assert depths["model.embed_tokens.weight"] is None and depths["lm_head.weight"] is None


def test_depth_bert_and_head() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=40, max_position_embeddings=16)
    names = _names(BertForSequenceClassification(config))
    depths, num = block_depths(names)
    assert num == 2
    assert depths["bert.encoder.layer.1.output.dense.weight"] == 1
    assert depths["bert.pooler.dense.weight"] is None
    assert merging.head_names(names, depths) == {"classifier.weight", "classifier.bias"}


def test_depth_vit() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=8, patch_size=4, num_labels=3)
    names = _names(ViTForImageClassification(config))
    depths, num = block_depths(names)
    assert num == 3
    block_names = [n for n in names if depths[n] is not None]
    assert block_names and all(re.search(rf"\.{depths[n]}\.", n) for n in block_names)
    assert depths["vit.embeddings.cls_token"] is None


def test_depth_timm_blocks_and_open_clip() -> None:
    names = ["patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.11.mlp.fc2.bias", "norm.weight", "head.weight"]
    depths, num = block_depths(names)
    assert num == 12 and depths["blocks.11.mlp.fc2.bias"] == 11 and depths["blocks.1.mlp.fc1.weight"] == 1
    assert depths["head.weight"] is None
    clip = ["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.3.mlp.c_fc.weight", "visual.proj"]
    depths, num = block_depths(clip)
    assert num == 4 and depths["visual.transformer.resblocks.3.mlp.c_fc.weight"] == 3 and depths["visual.proj"] is None


class _Bottleneck(nn.Module):
    def __init__(self, c: int, downsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)) if downsample else None


class _ResNetLike(nn.Module):
    """The torchvision ResNet naming: conv1/bn1, layer1..layer3 of residual blocks, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_Bottleneck(4), _Bottleneck(4))
        self.layer2 = nn.Sequential(_Bottleneck(4, True), _Bottleneck(4))
        self.layer3 = nn.Sequential(_Bottleneck(4, True))
        self.fc = nn.Linear(4, 10)


def test_depth_resnet_stages_counted_globally() -> None:
    names = _names(_ResNetLike())
    depths, num = block_depths(names)
    assert num == 5  # layer1.0, layer1.1, layer2.0, layer2.1, layer3.0
    assert depths["layer1.0.conv1.weight"] == 0
    assert depths["layer1.1.bn1.bias"] == 1
    assert depths["layer2.0.downsample.0.weight"] == 2  # `.0.` of downsample must not matter
    assert depths["layer2.1.conv1.weight"] == 3
    assert depths["layer3.0.downsample.1.weight"] == 4
    assert depths["conv1.weight"] is None and depths["fc.weight"] is None
    assert merging.head_names(names, depths) == {"fc.weight", "fc.bias"}


def test_depth_torchvision_vit_substring_trap() -> None:
    names = ["conv_proj.weight", "class_token", "encoder.pos_embedding"]
    for i in range(4):
        names += [f"encoder.layers.encoder_layer_{i}.ln_1.weight", f"encoder.layers.encoder_layer_{i}.mlp.0.weight", f"encoder.layers.encoder_layer_{i}.mlp.3.weight"]
    names += ["encoder.ln.weight", "heads.head.weight"]
    depths, num = block_depths(names)
    assert num == 4
    # the ".0." of "mlp.0" (LiNeS' reference substring rule would say block 0) must not win
    assert depths["encoder.layers.encoder_layer_3.mlp.0.weight"] == 3
    assert depths["encoder.layers.encoder_layer_2.mlp.3.weight"] == 2
    assert depths["encoder.ln.weight"] is None
    assert merging.head_names(names, depths) == {"heads.head.weight"}


def test_depth_sequential() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    depths, num = block_depths(_names(model))
    assert num == 3 and depths["0.weight"] == 0 and depths["2.bias"] == 1 and depths["4.weight"] == 2
    wrapped = ["net.0.weight", "net.3.weight", "net.3.bias"]
    assert block_depths(wrapped) == ({"net.0.weight": 0, "net.3.weight": 1, "net.3.bias": 1}, 2)


def test_depth_unknown_model_lists_names() -> None:
    names = [f"foo{i}.weight" for i in range(15)]
    with pytest.raises(ValueError, match="layer_pattern") as err:
        block_depths(names)
    assert "foo0.weight" in str(err.value) and "foo9.weight" in str(err.value) and "foo10.weight" not in str(err.value)
    assert "depth_map" in str(err.value)


def test_depth_explicit_pattern_and_map() -> None:
    names = ["stem.weight", "trunk.unit7.w", "trunk.unit8.w", "trunk.unit9.w"]
    depths, num = block_depths(names, layer_pattern=r"(?:^|\.)unit(\d+)\.")
    # the distinct matched indices are the blocks (issue 9.9): units 7, 8, 9 are blocks 0, 1, 2
    assert num == 3 and depths["trunk.unit9.w"] == 2 and depths["stem.weight"] is None
    depths, num = block_depths(names, depth_map={"trunk.unit7.w": 0, "trunk.unit8.w": 1, "trunk.unit9.w": 2})
    assert num == 3 and depths["trunk.unit8.w"] == 1 and depths["stem.weight"] is None
    with pytest.raises(ValueError, match="capture group"):
        block_depths(names, layer_pattern=r"unit\d+")
    with pytest.raises(ValueError, match="matched no name"):
        block_depths(names, layer_pattern=r"blk(\d+)")


# ---------------------------------------------------------------------------------- task vectors and LiNeS
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3) for _ in range(3)])
        self.norm = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)
        self.register_buffer("position_ids", torch.arange(3))


def _pair(seed: int = 0) -> tuple[_Tiny, _Tiny]:
    torch.manual_seed(seed)
    base, ft = _Tiny(), _Tiny()
    ft.norm.running_mean.fill_(0.5)
    ft.norm.num_batches_tracked.fill_(7)
    return base, ft


def test_task_vector_skips_buffers_and_checks_keys() -> None:
    base, ft = _pair()
    tau = task_vector(base, ft)
    assert set(tau) == {n for n, _ in ft.named_parameters()}
    assert torch.equal(tau["blocks.1.weight"], ft.blocks[1].weight - base.blocks[1].weight)
    # from state dicts: running stats, counters and integer buffers are not task-vector entries
    tau_sd = task_vector(base.state_dict(), ft.state_dict())
    assert set(tau_sd) == set(tau)
    sd = ft.state_dict()
    del sd["head.bias"]
    with pytest.raises(KeyError, match="missing"):
        task_vector(sd, ft.state_dict())
    bad = base.state_dict()
    bad["head.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shape"):
        task_vector(bad, ft.state_dict())
    with pytest.raises(TypeError, match="state dict"):
        task_vector([1, 2], ft)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "expected_head_scale"), [("exclude", 1.0), ("alpha", 0.2), ("alpha_plus_beta", 0.2 + 0.6), ("one", 1.0)]
)
def test_lines_scale_per_block_and_head_policies(policy: str, expected_head_scale: float) -> None:
    base, ft = _pair()
    out = lines_scale(base, ft, alpha=0.2, beta=0.6, head_policy=policy)  # type: ignore[arg-type]
    b, f = base.state_dict(), ft.state_dict()
    for i, lam in enumerate([0.2, 0.5, 0.8]):  # L = 3: α, α + β/2, α + β
        name = f"blocks.{i}.weight"
        assert torch.allclose(out[name], b[name] + lam * (f[name] - b[name]))
    # BatchNorm affine parameters are outside the blocks: α
    assert torch.allclose(out["norm.weight"], b["norm.weight"] + 0.2 * (f["norm.weight"] - b["norm.weight"]))
    assert torch.allclose(out["head.weight"], b["head.weight"] + expected_head_scale * (f["head.weight"] - b["head.weight"]))
    if policy == "exclude":
        assert torch.equal(out["head.weight"], f["head.weight"])
    # buffers are the fine-tuned model's, untouched, with their dtypes
    assert torch.equal(out["norm.running_mean"], f["norm.running_mean"])
    assert out["norm.num_batches_tracked"].item() == 7 and out["position_ids"].dtype == torch.long
    # inputs are not modified
    assert torch.equal(ft.state_dict()["blocks.0.weight"], f["blocks.0.weight"])


def test_lines_scale_default_beta_and_extremes() -> None:
    base, ft = _pair()
    keep = lines_scale(base, ft, alpha=1.0)  # β = 1 − α = 0: everything keeps its update
    for name, value in ft.state_dict().items():
        assert torch.allclose(keep[name].float(), value.float())
    reset = lines_scale(base.state_dict(), ft.state_dict(), alpha=0.0, beta=0.0, head_policy="alpha")
    for name, _ in ft.named_parameters():
        assert torch.allclose(reset[name], base.state_dict()[name])


def test_lines_scale_tied_weights_gpt2() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base, ft = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    out = lines_scale(base, ft, alpha=0.3)
    # lm_head is tied to wte: one parameter, scaled once with α (embedding), identical under both names
    assert torch.equal(out["lm_head.weight"], out["transformer.wte.weight"])
    expected = base.transformer.wte.weight + 0.3 * (ft.transformer.wte.weight - base.transformer.wte.weight)
    assert torch.allclose(out["transformer.wte.weight"], expected)
    base.load_state_dict(out)
    assert base.lm_head.weight.data_ptr() == base.transformer.wte.weight.data_ptr()


# ---------------------------------------------------------------------------------- merging
def _vec_state(values: list[float]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def test_ties_hand_computed_three_tasks() -> None:
    base = _vec_state([1.0] * 5)
    taus = [
        [4.0, -1.0, 2.0, 0.5, -3.0],
        [-2.0, 5.0, 1.0, -6.0, 0.2],
        [1.0, 3.0, -0.5, -2.0, 4.0],
    ]
    finetuned = [_vec_state([1.0 + x for x in t]) for t in taus]
    # k = 0.6 keeps ceil(0.6 * 5) = 3 entries of largest magnitude per task vector:
    #   τ1 = [4, -1, 2, .5, -3]   -> |4|, |-3|, |2|     -> [ 4, 0, 2,  0, -3]
    #   τ2 = [-2, 5, 1, -6, .2]   -> |-6|, |5|, |-2|    -> [-2, 5, 0, -6,  0]
    #   τ3 = [1, 3, -.5, -2, 4]   -> |4|, |3|, |-2|     -> [ 0, 3, 0, -2,  4]
    # elected sign = sign of the sum [2, 8, 2, -8, 1]   -> [+, +, +, -, +]
    # disjoint mean of the agreeing non-zero entries:
    #   e0: {4} -> 4 (−2 disagrees);  e1: {5, 3} -> 4;  e2: {2} -> 2;
    #   e3: {−6, −2} -> −4;           e4: {4} -> 4 (−3 disagrees)
    # merged τ = [4, 4, 2, -4, 4];  θ = θ0 + 0.5·τ = [3, 3, 2, -1, 3]
    out = ties_merge(base, finetuned, k=0.6, scaling=0.5, trim="ceil")
    assert torch.allclose(out["w"], torch.tensor([3.0, 3.0, 2.0, -1.0, 3.0]))
    # norm-ratio α = (1/T)·‖Στ‖₁/‖τ_ties‖₁ = ‖[3, 7, 2.5, -7.5, 1.2]‖₁ / (3·18) = 21.2 / 54
    ties_tau = merging.ties_vector([{"w": torch.tensor(t)} for t in taus], k=0.6, trim="ceil")
    alpha = norm_ratio_alpha([{"w": torch.tensor(t)} for t in taus], ties_tau)
    assert alpha == pytest.approx(21.2 / 54)
    # with LiNeS on a one-block model (the name `w` is outside any block -> α; use depth_map)
    lined = merge(base, finetuned, method="ties", k=0.6, lines_beta=0.5, depth_map={"w": 0}, trim="ceil")
    assert torch.allclose(lined["w"], torch.tensor([1.0] * 5) + (21.2 / 54 + 0.5) * torch.tensor([4.0, 4.0, 2.0, -4.0, 4.0]))


def test_ties_zero_where_no_agreement_and_k_bounds() -> None:
    taus = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-1.0, 0.0])}]
    # sum is 0 -> elected sign 0 -> no entry agrees -> zero
    assert torch.equal(merging.ties_vector(taus, k=1.0)["w"], torch.zeros(2))
    with pytest.raises(ValueError, match="`k`"):
        merging.ties_vector(taus, k=0.0)


def test_task_arithmetic_and_norm_ratio_is_one_over_T() -> None:
    torch.manual_seed(0)
    base = _Tiny()
    fts = [_Tiny() for _ in range(3)]
    out = task_arithmetic(base, fts, scaling=0.3)
    b = base.state_dict()
    for name, _ in base.named_parameters():
        expected = b[name] + 0.3 * sum(f.state_dict()[name] - b[name] for f in fts)
        assert torch.allclose(out[name], expected, atol=1e-6)
    # float buffers averaged, integer ones from θ0
    assert torch.allclose(out["norm.running_var"], torch.stack([f.norm.running_var for f in fts]).mean(0))
    assert torch.equal(out["position_ids"], torch.arange(3))
    taus = [task_vector(base, f) for f in fts]
    total = {n: sum(t[n] for t in taus) for n in taus[0]}
    assert norm_ratio_alpha(taus, total) == pytest.approx(1 / 3)


def test_merge_with_lines_task_arithmetic() -> None:
    torch.manual_seed(1)
    base = _Tiny()
    fts = [_Tiny() for _ in range(2)]
    out = merge(base, fts, method="task_arithmetic", lines_beta=0.4, head_policy="alpha")
    b = base.state_dict()
    alpha = 1 / 2
    for i, lam in enumerate([alpha, alpha + 0.2, alpha + 0.4]):
        name = f"blocks.{i}.bias"
        total = sum(f.state_dict()[name] - b[name] for f in fts)
        assert torch.allclose(out[name], b[name] + lam * total, atol=1e-6)
    total = sum(f.state_dict()["head.weight"] - b["head.weight"] for f in fts)
    assert torch.allclose(out["head.weight"], b["head.weight"] + alpha * total, atol=1e-6)
    assert set(out) == set(fts[0].state_dict())


def test_merge_argument_errors() -> None:
    base, ft = _pair()
    with pytest.raises(ValueError, match="method"):
        merge(base, [ft], method="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lines_beta"):
        merge(base, [ft], alpha=0.3)
    with pytest.raises(ValueError, match="scaling"):
        merge(base, [ft], lines_beta=0.5, scaling=0.3)
    with pytest.raises(TypeError, match="list"):
        merge(base, ft)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        merge(base, [])


# ---------------------------------------------------------------------------------- PEFT
def test_peft_lora_merge_and_unload_and_lora_delta_scaling() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():  # "fine-tune": give the adapters non-zero B
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    adapter_state = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = peft_model.merge_and_unload()
    ft_state = merged.state_dict()
    out = lines_scale(base_state, ft_state, alpha=0.25)
    name = "transformer.h.0.attn.c_attn.weight"  # block 0 of 2 -> α
    assert torch.allclose(out[name], base_state[name] + 0.25 * (ft_state[name] - base_state[name]), atol=1e-6)
    name = "transformer.h.1.attn.c_attn.weight"  # last block -> α + β = 1
    assert torch.allclose(out[name], ft_state[name], atol=1e-6)

    # Scaling the unmerged adapters (B by λ, A kept) equals scaling the merged delta.
    torch.manual_seed(0)
    zero_adapters = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    theta0 = {k: (torch.zeros_like(v) if "lora_B" in k else v.clone()) for k, v in adapter_state.items()}
    scaled_adapters = lines_scale(theta0, adapter_state, alpha=0.25)
    zero_adapters.load_state_dict(scaled_adapters)
    via_adapters = zero_adapters.merge_and_unload().state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(via_adapters[name], out[name], atol=1e-6)


# ---------------------------------------------------------------------------------- CLI
def test_merge_cli_checkpoints_and_state_dicts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_forget.merge_cli import main

    torch.manual_seed(0)
    base = _Tiny()
    fts = [_Tiny() for _ in range(3)]
    paths = []
    for i, f in enumerate(fts):
        ckpt = {"state_dict": f.state_dict(), "epoch": 1, "optimizer_states": [{}], "hyper_parameters": {"x": i}}
        paths.append(str(tmp_path / f"ft{i}.ckpt"))
        torch.save(ckpt, paths[-1])
    torch.save(base.state_dict(), tmp_path / "base.pt")
    out_path = tmp_path / "merged.ckpt"
    merged = main(["--pretrained", str(tmp_path / "base.pt"), "--finetuned", *paths, "--method", "ties", "--k", "0.5", "--lines_beta", "0.7", "--output", str(out_path)])
    expected = merge(base, fts, method="ties", k=0.5, lines_beta=0.7)
    saved = torch.load(out_path, weights_only=False)
    assert "optimizer_states" not in saved and saved["hyper_parameters"] == {"x": 0}
    for name in expected:
        assert torch.allclose(saved["state_dict"][name], expected[name])
        assert torch.allclose(merged[name], expected[name])
    plain = tmp_path / "plain.pt"
    for i, f in enumerate(fts):
        torch.save(f.state_dict(), tmp_path / f"ft{i}.pt")
    main(["--pretrained", str(tmp_path / "base.pt"), "--finetuned", *[str(tmp_path / f"ft{i}.pt") for i in range(3)], "--output", str(plain)])
    saved = torch.load(plain, weights_only=True)
    expected = task_arithmetic(base, fts)
    assert all(torch.allclose(saved[n], expected[n]) for n in expected)
    with pytest.raises(SystemExit):
        main(["--pretrained", str(tmp_path / "base.pt"), "--finetuned", paths[0], "--output", paths[0]])
    with pytest.raises(SystemExit):
        main(["--pretrained", str(tmp_path / "base.pt"), "--finetuned", paths[0], "--alpha", "0.3", "--output", str(tmp_path / "x.pt")])


# ---------------------------------------------------------------- TIES variants, hand-computed
def _tv(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values)}


def test_ties_official_trim_keeps_one_more_when_k_n_is_an_integer() -> None:
    tau = [_tv(5.0, -4.0, 3.0, 2.0, 1.0)]
    # n = 5, k = 0.4: k·n = 2 is an integer -> "official" keeps int(2) + 1 = 3, "ceil" keeps 2.
    official = merging.ties_vector(tau, k=0.4)["w"]
    ceil = merging.ties_vector(tau, k=0.4, trim="ceil")["w"]
    assert torch.equal(official, torch.tensor([5.0, -4.0, 3.0, 0.0, 0.0]))
    assert torch.equal(ceil, torch.tensor([5.0, -4.0, 0.0, 0.0, 0.0]))
    # k·n = 2.5 is not an integer: both keep ⌈2.5⌉ = int(2.5) + 1 = 3.
    for trim in ("official", "ceil"):
        assert torch.equal(merging.ties_vector(tau, k=0.5, trim=trim)["w"], torch.tensor([5.0, -4.0, 3.0, 0.0, 0.0]))
    # Capped at n: k = 1 keeps all 5 (not 6).
    assert torch.equal(merging.ties_vector(tau, k=1.0)["w"], tau[0]["w"])


@pytest.mark.parametrize(
    ("taus", "majority_value"),
    [
        # sums [0, 3, 4]: signs [0, +, +], majority sign + -> entry 0 takes the mean of the positives (1)
        (([1.0, 2.0, 3.0], [-1.0, 1.0, 1.0]), 1.0),
        # sums [0, -3, -4]: majority sign - -> entry 0 takes the mean of the negatives (-1)
        (([1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]), -1.0),
    ],
)
def test_ties_zero_elected_sign_takes_the_majority_sign(taus, majority_value) -> None:
    vectors = [_tv(*t) for t in taus]
    majority = merging.ties_vector(vectors, k=1.0)["w"]
    zero = merging.ties_vector(vectors, k=1.0, zero_sign="zero")["w"]
    rest = [(a + b) / 2 for a, b in zip(taus[0][1:], taus[1][1:])]  # both agree on entries 1 and 2
    assert torch.allclose(majority, torch.tensor([majority_value, *rest]))
    assert torch.allclose(zero, torch.tensor([0.0, *rest]))


class _Tied(nn.Module):
    """``a`` is one tensor under two state-dict keys (``a`` and ``b``), like GPT-2's tied head."""

    def __init__(self, a: list[float], c: list[float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = self.a
        self.c = nn.Parameter(torch.tensor(c))


def test_ties_counts_a_tied_weight_per_key_or_once() -> None:
    base, tuned = _Tied([0.0, 0.0], [0.0, 0.0]), _Tied([4.0, 1.0], [3.0, 2.0])
    assert list(base.state_dict()) == ["a", "b", "c"]
    # per_key: n = 2 + 2 + 2 = 6 (a counted under a and b), k = 0.25 keeps int(1.5) + 1 = 2 of
    # |[4, 1, 4, 1, 3, 2]| -> threshold 4: only a[0] survives.
    per_key = ties_merge(base, [tuned], k=0.25)
    assert torch.equal(per_key["a"], torch.tensor([4.0, 0.0])) and torch.equal(per_key["c"], torch.zeros(2))
    # once: n = 4, keeps int(1) + 1 = 2 of |[4, 1, 3, 2]| -> threshold 3: a[0] and c[0].
    once = ties_merge(base, [tuned], k=0.25, count_tied="once")
    assert torch.equal(once["a"], torch.tensor([4.0, 0.0])) and torch.equal(once["c"], torch.tensor([3.0, 0.0]))
    for out in (per_key, once):  # the merged weights stay tied
        assert torch.equal(out["a"], out["b"])


def test_ties_majority_sign_counts_a_tied_weight_per_key() -> None:
    # Two tasks, keep everything (k = 1). Entry a[0]'s elected sign is 0; the other entries
    # elect a[1]: -, c: +, +.
    base = _Tied([0.0, 0.0], [0.0, 0.0])
    t1, t2 = _Tied([1.0, -1.0], [1.0, 1.0]), _Tied([-1.0, -1.0], [1.0, 1.0])
    # per_key: elected signs a = [0, -] (twice), c = [+, +] -> sum 2·(-1) + 2 = 0 -> majority 0:
    # a[0] has no side to take and stays 0.
    per_key = ties_merge(base, [t1, t2], k=1.0)
    assert torch.equal(per_key["a"], torch.tensor([0.0, -1.0]))
    # once: sum -1 + 2 = +1 -> a[0] takes the positive value 1.
    once = ties_merge(base, [t1, t2], k=1.0, count_tied="once")
    assert torch.equal(once["a"], torch.tensor([1.0, -1.0]))
    assert torch.equal(once["c"], torch.tensor([1.0, 1.0]))
