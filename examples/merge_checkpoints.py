"""Merge models fine-tuned from one pre-trained model, with and without LiNeS (Python API).

Runs offline in seconds: a tiny GPT-2 built from a config stands in for the pre-trained model,
three perturbed copies stand in for its fine-tuned versions. With your own checkpoints, load
them with ``torch.load(path)["state_dict"]`` (Lightning) or ``torch.load(path)`` and call the
same functions; from the shell, ``lightning-forget merge --pretrained ... --finetuned ...``
does the same (see ``lightning_forget/merge_cli.py``).

    python examples/merge_checkpoints.py
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_forget.merging import block_depths, lines_scale, merge, task_arithmetic, task_vector, ties_merge


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    pretrained = GPT2LMHeadModel(config)
    finetuned = []
    for _ in range(3):  # "fine-tuning": small random updates
        model = GPT2LMHeadModel(config)
        model.load_state_dict(pretrained.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        finetuned.append(model)

    depths, num_blocks = block_depths([n for n, _ in pretrained.named_parameters()])
    print(f"GPT-2 blocks found: {num_blocks} (e.g. transformer.h.3.mlp.c_fc.weight -> {depths['transformer.h.3.mlp.c_fc.weight']})")

    # Single task: pull shallow layers back toward the pre-trained weights.
    edited = lines_scale(pretrained, finetuned[0], alpha=0.1)  # β = 1 − α: the last block keeps its update
    tau = task_vector(pretrained, finetuned[0])
    kept = task_vector(pretrained.state_dict(), {n: edited[n] for n in tau})
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.3.attn.c_attn.weight"):
        print(f"  {name}: kept {float(kept[name].norm() / tau[name].norm()):.2f} of its update")

    # Multi-task merging.
    merged = {
        "task arithmetic (0.3)": task_arithmetic(pretrained, finetuned, scaling=0.3),
        "TIES (k=0.2)": ties_merge(pretrained, finetuned, k=0.2),
        "task arithmetic + LiNeS (β=0.5)": merge(pretrained, finetuned, "task_arithmetic", lines_beta=0.5),
        "TIES + LiNeS (β=1.0)": merge(pretrained, finetuned, "ties", k=0.2, lines_beta=1.0),
    }
    model = GPT2LMHeadModel(config)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    for name, state in merged.items():
        model.load_state_dict(state)
        with torch.no_grad():
            loss = model(tokens, labels=tokens).loss
        print(f"  {name:<34} loads fine; loss on random tokens {float(loss):.3f}")


if __name__ == "__main__":
    main()
