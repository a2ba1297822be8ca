"""lightning_forget.lora: target modules by structure, typed settings, adapter parameters and files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_forget.lora import (
    LoRASettings,
    adapter_parameters,
    adapter_state_dict,
    add_lora,
    find_blocks,
    find_target_modules,
    load_adapter,
    load_adapter_state_dict,
    match_target_modules,
    peft_model_of,
    save_adapter,
)
from lightning_forget.modules.causal_lm import build_tiny_causal_lm


def tiny_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       image_size=8, patch_size=4, num_channels=1, num_labels=3)
    return ViTForImageClassification(config)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                vocab_size=40))


class TimmStyleBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.fc2 = nn.Linear(2 * dim, dim)


class TimmStyleViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([TimmStyleBlock(), TimmStyleBlock(), TimmStyleBlock()])
        self.head = nn.Linear(8, 2)


def gpt2() -> nn.Module:
    return build_tiny_causal_lm("gpt2", vocab_size=40, block_size=16, n_layer=2, n_embd=16, n_head=2)


def llama() -> nn.Module:
    return build_tiny_causal_lm("llama", vocab_size=40, block_size=16, n_layer=2, n_embd=16, n_head=2)


FAMILIES = {
    "gpt2": (gpt2, ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"], "transformer.h"),
    "llama": (llama, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "model.layers"),
    "bert": (tiny_bert, ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
             ["intermediate.dense", "output.dense"], "encoder.layer"),
    "vit": (tiny_vit, ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
            ["mlp.fc1", "mlp.fc2"], "vit.layers"),
    "timm": (TimmStyleViT, ["attn.qkv", "attn.proj"], ["mlp.fc1", "mlp.fc2"], "blocks"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_found_by_structure(family: str) -> None:
    build, attention, ffn, blocks = FAMILIES[family]
    model = build()
    n = len(find_blocks(model))
    assert [name for name, _ in find_blocks(model)] == [f"{blocks}.{i}" for i in range(n)]
    assert find_target_modules(model, "attention") == [f"{blocks}.{i}.{s}" for i in range(n) for s in attention]
    assert find_target_modules(model, "ffn") == [f"{blocks}.{i}.{s}" for i in range(n) for s in ffn]
    grouped = find_target_modules(model, "ffn", by_block=True)
    assert list(grouped) == [f"{blocks}.{i}" for i in range(n)]
    assert grouped[f"{blocks}.0"] == [f"{blocks}.0.{s}" for s in ffn]
    assert sorted(find_target_modules(model, "all")) == sorted(find_target_modules(model, "attention")
                                                               + find_target_modules(model, "ffn"))


def test_plain_model_needs_explicit_patterns() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(RuntimeError, match="target_modules"):
        find_target_modules(model)
    assert match_target_modules(model, ["0", "2"]) == ["0", "2"]
    assert match_target_modules(model, r"\d") == ["0", "2"]
    with pytest.raises(ValueError, match="'5' matches none"):
        match_target_modules(model, ["0", "5"])
    with pytest.raises(ValueError, match="regular expression"):
        match_target_modules(model, "fc.*")
    assert match_target_modules(TimmStyleViT(), r"blocks\.\d+\.mlp\.fc[12]") == [
        f"blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, "`r`"),
        ({"r": 2.0}, TypeError, "`r`"),
        ({"alpha": 0}, ValueError, "`alpha`"),
        ({"dropout": 1.0}, ValueError, "`dropout`"),
        ({"kind": "mlp"}, ValueError, "`kind`"),
        ({"target_modules": 3}, TypeError, "`target_modules`"),
        ({"target_modules": []}, TypeError, "`target_modules`"),
        ({"modules_to_save": "classifier"}, TypeError, "`modules_to_save`"),
    ],
)
def test_settings_errors(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        LoRASettings(**kwargs)


def test_settings_build_lora_config_and_only_adapters_train() -> None:
    model = gpt2()
    settings = LoRASettings(r=2, alpha=4, dropout=0.1, kind="ffn")
    config = settings.lora_config(model)
    assert config.r == 2 and config.lora_alpha == 4 and config.lora_dropout == 0.1
    assert sorted(config.target_modules) == sorted(find_target_modules(model, "ffn"))
    assert config.fan_in_fan_out  # GPT-2's Conv1D
    peft_model = add_lora(model, settings)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable == list(adapter_parameters(peft_model))
    assert len(trainable) == 2 * 2 * 2  # A and B of two FFN linears in two blocks
    assert all(".mlp." in name for name in trainable)


def test_second_adapter_parameters_and_state_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.model = add_lora(tiny_vit(), LoRASettings(r=2, modules_to_save=["classifier"]))
    add_lora(holder.model, LoRASettings(r=2, modules_to_save=["classifier"]), adapter_name="slow")
    assert peft_model_of(holder) is holder.model
    assert find_target_modules(holder.model.get_base_model()) == find_target_modules(tiny_vit())
    fast, slow = adapter_parameters(holder, "default"), adapter_parameters(holder, "slow")
    assert len(fast) == len(slow) > 0
    assert all(name.startswith("model.") for name in fast)
    assert any("modules_to_save.default" in name for name in fast)
    assert not set(fast) & set(slow)
    with torch.no_grad():
        for p in fast.values():
            p.add_(torch.randn_like(p))
    state = adapter_state_dict(holder, "default")
    assert all(".default" not in key for key in state)
    load_adapter_state_dict(holder, state, "slow")
    for a, b in zip(fast.values(), slow.values()):
        assert torch.equal(a, b)
    path = save_adapter(holder, tmp_path / "a.safetensors", "default", metadata={"task": 3})
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(state)  # adapter tensors only, no base weight
    fresh = add_lora(tiny_vit(), LoRASettings(r=2, modules_to_save=["classifier"]))
    assert load_adapter(fresh, path) == {"task": 3}
    for a, b in zip(adapter_parameters(fresh).values(), fast.values()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(add_lora(tiny_vit(), LoRASettings(r=2)), state)
    with pytest.raises(ValueError, match="adapter_name"):
        adapter_parameters(holder, "nope")
    with pytest.raises(ValueError, match="adapter_name"):
        add_lora(holder.model, LoRASettings(r=2), adapter_name="slow")


def test_peft_model_of_refuses_plain_module() -> None:
    with pytest.raises(RuntimeError, match="add_lora"):
        peft_model_of(nn.Linear(2, 2))
