"""Evaluate a causal LM after (or during) unlearning, as open-unlearning's TOFU evaluation does; no Lightning.

:func:`evaluate_lm_unlearning` takes a model, QA splits (``forget``, ``retain``, ``holdout``,
``world_facts``; records with ``question``, ``answer``, ``paraphrased_answer`` and
``perturbed_answer``, or :class:`~lightning_forget.datamodules.QADataset` s) and a tokenizer, and
returns the global metrics (forget quality, model utility, privacy leakage, the MIA AUCs,
extraction strength, exact memorisation, and each split's probability, ROUGE-L recall and Truth
Ratio) together with the per-sample statistics they come from. What it returns on the **retain
model** is the ``retain_stats`` of a later evaluation (forget quality and privacy leakage compare
with it); it is plain JSON.

Computation (``UNLEARNING.md`` §2.2; the functions are in :mod:`lightning_forget.metrics.functional_lm`):

- Every answer variant of a split (the answer, the paraphrased answer, each perturbed answer) is
  tokenised as ``prompt + answer + end id`` and forwarded in batches (rows sorted by length, right
  padding); per sample: ``avg_loss`` (mean answer-token NLL, the end id included), probability
  ``exp(−avg_loss)``, and on the answer: exact memorisation, extraction strength, Min-K (k = 0.4),
  Min-K++ (k = 0.4) on the answer positions but the last (:func:`tokenwise_labels`), ZLib
  (``avg_loss / len(zlib(answer text))``).
- Truth Ratio per question: ``exp(−mean_k avg_loss_perturbed) / exp(−avg_loss_paraphrased)``;
  normalised probability ``p_answer / (p_answer + Σ_k p_perturbed)``.
- GradNorm (forget and holdout): the batch is forwarded once and each sample's gradient taken
  from it (:func:`gradnorm_score`, p = 2).
- ROUGE-L recall of greedy generations (left-padded batches, ``max_new_tokens`` 200, stopped at
  the end id) against the answer.
- Global: ``forget_quality`` = KS-test p-value of the forget Truth Ratios against the retain
  model's; ``model_utility`` = harmonic mean of retain probability, ROUGE-L and Truth Ratio
  (``true_better``) and world-facts normalised probability, ROUGE-L and Truth Ratio; the MIA
  AUCs forget (0) against holdout (1); ``privacy_leakage`` from the Min-K AUC and the retain
  model's (0.5 without retain statistics); ``extraction_strength`` and ``exact_memorization``
  are forget-set means.

Distributed use: with ``world_size > 1`` each rank evaluates the samples a ``DistributedSampler``
(no shuffle, ``drop_last=False``) would give it: every split is padded to a multiple of
``world_size`` by repeating its first samples, and rank ``r`` takes positions ``r, r + world,
…``. The per-sample rows of every split travel in **one** ``all_gather`` (equal sizes on every
rank), the repeats are dropped by sample index (:func:`deduplicate_by_index`) and only then are the
global statistics computed, so every rank returns the single-process values.

Deviations from open-unlearning (also in ``docs/fidelity.md``): no real-authors split (model
utility is the harmonic mean of six values, not nine; without ``generate`` of four);
ROUGE without stemming (:func:`rouge_l_recall`); GradNorm in the model's eval mode, one forward
per batch, the model's ``.grad`` untouched; every sample of a split is used (TOFU evaluates
retain utility on a 400-question subset, ``retain_perturbed``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.metrics.functional_lm import (
    average_nll,
    deduplicate_by_index,
    exact_memorization,
    extraction_strength,
    forget_quality,
    GRADNORM_NO_PARAMETERS,
    gradnorm_losses,
    gradnorm_score,
    membership_auc,
    min_k_plus_plus_score,
    min_k_score,
    model_utility,
    normalised_probability,
    privacy_leakage,
    reference_score,
    rouge_l_recall,
    tokenwise_labels,
    truth_ratio,
    truth_ratio_score,
    zlib_score,
)
from lightning_forget.sharding import is_sharded
from lightning_forget.unlearning.losses import IGNORE_INDEX, shift_for_next_token

__all__ = ["SPLITS", "MIA_ATTACKS", "DEFAULT_PROMPT", "evaluate_lm_unlearning", "shard_indices", "data_hash",
           "split_hashes", "load_stats"]

SPLITS = ("forget", "retain", "holdout", "world_facts")
"""The split names :func:`evaluate_lm_unlearning` knows (``forget`` is required)."""

MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
"""The membership attacks, reported as ``mia_<attack>`` (ROC AUC forget vs holdout)."""

DEFAULT_PROMPT = "Question: {question}\nAnswer: "
"""The prompt of :class:`~lightning_forget.datamodules.QADataset` (and of the records given as dicts)."""

Records = Sequence[Mapping[str, Any]]

# ---------------------------------------------------------------------------------- inputs
def _split_records(name: str, data: Any, prompt_format: str) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The records of a split and their prompts (a QADataset keeps its own prompts)."""
    pairs = getattr(getattr(data, "tokens", None), "pairs", None)
    records = getattr(data, "records", None)
    if records is not None and pairs is not None:
        return list(records), [prompt for prompt, _ in pairs]
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"splits[{name!r}] must be a QADataset or a list of QA records (dicts), got "
                        f"{type(data).__name__}. Fix: pass datamodule.dataset({name!r}) or datamodule.records({name!r}).")
    records = list(data)
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "question" not in r or "answer" not in r:
            raise ValueError(f"splits[{name!r}][{i}] must be a dict with 'question' and 'answer' (and "
                             f"'paraphrased_answer', 'perturbed_answer'), got {r!r}.")
    return records, [prompt_format.format(question=r["question"]) for r in records]


def _check_splits(splits: Any) -> None:
    if not isinstance(splits, Mapping):
        raise TypeError(f"splits must be a dict {{name: records or QADataset}}, got {type(splits).__name__}. "
                        "Fix: pass {'forget': ..., 'retain': ..., 'holdout': ..., 'world_facts': ...}.")
    unknown = [k for k in splits if k not in SPLITS]
    if unknown:
        raise ValueError(f"splits has unknown names {unknown}; the known splits are {list(SPLITS)}.")
    if "forget" not in splits:
        raise ValueError(f"splits needs a 'forget' split, got {list(splits)}. Fix: add splits['forget'].")


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The dataset indices a ``DistributedSampler(shuffle=False, drop_last=False)`` gives ``rank``.

    The order ``0..n−1`` is padded to a multiple of ``world_size`` by repeating it from the start,
    and ``rank`` takes every ``world_size``-th position from ``rank``: every rank gets
    ``ceil(n / world_size)`` indices, some of them repeats.
    """
    if n == 0:
        return []
    total = math.ceil(n / world_size) * world_size
    order = list(range(n)) * math.ceil(total / n)
    return order[:total][rank:total:world_size]


def data_hash(records: Records, prompts: Sequence[str], tokenizer: Any) -> str:
    """A SHA-256 of a split's prompts, answers and tokenizer (what its statistics depend on)."""
    payload = [[p, str(r["answer"]), str(r.get("paraphrased_answer", r["answer"])),
                [str(w) for w in r.get("perturbed_answer", [])]] for r, p in zip(records, prompts)]
    text = json.dumps({"tokenizer": repr(tokenizer), "records": payload}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_hashes(splits: Mapping[str, Any], tokenizer: Any, prompt_format: str = DEFAULT_PROMPT) -> dict[str, str]:
    """``{split: data_hash}`` of ``splits`` as :func:`evaluate_lm_unlearning` reads them (``result["data_hash"]``)."""
    _check_splits(splits)
    return {name: data_hash(*_split_records(name, data, prompt_format), tokenizer) for name, data in splits.items()}


def load_stats(stats: Union[str, os.PathLike, Mapping[str, Any]], argument: str = "retain_stats") -> dict[str, Any]:
    """Statistics returned by :func:`evaluate_lm_unlearning` (a dict, or the path of its JSON)."""
    if isinstance(stats, (str, os.PathLike)):
        path = os.fspath(stats)
        if not os.path.isfile(path):
            raise ValueError(f"{argument}={path!r} is not a file. Fix: pass the JSON written from "
                             "evaluate_lm_unlearning(retain_model, ...), or its dict.")
        with open(path) as handle:
            stats = json.load(handle)
    if not isinstance(stats, Mapping) or "per_sample" not in stats or "metrics" not in stats:
        raise ValueError(f"{argument} must be what evaluate_lm_unlearning returns (keys 'metrics', "
                         f"'per_sample', ...), got {type(stats).__name__} with keys "
                         f"{list(stats)[:6] if isinstance(stats, Mapping) else None}.")
    return dict(stats)


# ---------------------------------------------------------------------------------- model calls
def _logits(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    return getattr(output, "logits", output)


def _callable_model(model: Any) -> Any:
    """The module to call: ``model``, or its ``.model`` when it is a LightningModule without a ``forward``.

    A user's LightningModule often keeps the Hugging Face model in ``self.model`` and calls it in
    ``training_step`` without defining ``forward``; calling such a module would raise.
    """
    import lightning.pytorch as pl

    inner = getattr(model, "model", None)
    if (isinstance(model, pl.LightningModule) and type(model).forward is pl.LightningModule.forward
            and isinstance(inner, nn.Module)):
        return inner
    return model


def _generator_model(model: Any) -> Any:
    """The object with Hugging Face ``generate`` (the model, or a LightningModule's ``.model``)."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and callable(getattr(candidate, "generate", None)):
            return candidate
    raise TypeError(f"generate=True needs a Hugging Face causal LM (with .generate), or a module whose .model is "
                    f"one (CausalLMModule); got {type(model).__name__}. Fix: pass the HF model, or generate=False.")


def _context_length(model: Any) -> Optional[int]:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _device_of(model: Any) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------- per rank
def _tokenise(tokenizer: Any, prompt: str, answer: str, end_id: int, where: str) -> tuple[Tensor, Tensor]:
    p, a = tokenizer.encode(prompt), tokenizer.encode(str(answer))
    if not a:
        raise ValueError(f"{where}: the answer {answer!r} has no tokens. Fix: drop empty answers (every "
                         "token-wise statistic needs an answer token before the end id).")
    ids = torch.tensor(p + a + [end_id], dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(p) + a + [end_id], dtype=torch.long)
    return ids, labels


def _pad_right(rows: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(int(ids.numel()) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : x.numel()], labels[i, : y.numel()], mask[i, : x.numel()] = x, y, 1
    return ids, labels, mask


def _padding_batches(batches: int, synced: bool) -> int:
    """How many batches this rank runs beyond its ``batches`` so that every rank runs the busiest
    rank's count (a sharded forward is collective); 0 unless ``synced``."""
    if not synced:
        return 0
    most = torch.tensor([batches], dtype=torch.int64)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most) - batches


def _forward_rows(model: Any, rows: list[tuple[Tensor, Tensor]], answer_rows: int, batch_size: int, device: torch.device,
                  k: float, pad_id: int, texts: Sequence[str], synced: bool = False) -> dict[str, Tensor]:
    """Per-row ``avg_nll``; for the first ``answer_rows`` rows also the answer statistics. ``synced``
    (a sharded model): padding forwards (results dropped) until every rank has run as many batches."""
    order = sorted(range(len(rows)), key=lambda i: int(rows[i][0].numel()))
    out = {"avg_nll": torch.empty(len(rows), dtype=torch.float64)}
    for key in ("exact_memorization", "extraction_strength", "min_k", "min_k_plus_plus"):
        out[key] = torch.empty(answer_rows, dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids, labels, mask = _pad_right([rows[i] for i in chosen], pad_id)
        logits, targets = shift_for_next_token(_logits(model, ids.to(device), mask.to(device)), labels.to(device))
        where = torch.tensor(chosen)
        out["avg_nll"][where] = average_nll(logits, targets).double().cpu()
        is_answer = where < answer_rows
        if bool(is_answer.any()):
            sel = is_answer.nonzero().flatten().to(logits.device)
            token_targets = tokenwise_labels(targets.index_select(0, sel))
            answer_logits = logits.index_select(0, sel)
            at = where[is_answer]
            out["exact_memorization"][at] = exact_memorization(answer_logits, token_targets).double()
            out["extraction_strength"][at] = extraction_strength(answer_logits, token_targets).double()
            out["min_k"][at] = min_k_score(answer_logits, token_targets, k).double()
            out["min_k_plus_plus"][at] = min_k_plus_plus_score(answer_logits, token_targets, k).double()
    for _ in range(_padding_batches(-(-len(order) // batch_size), synced)):
        ids, labels, mask = _pad_right(rows[:1] or [(torch.tensor([pad_id]), torch.tensor([IGNORE_INDEX]))], pad_id)
        _logits(model, ids.to(device), mask.to(device))
    if answer_rows:
        out["zlib"] = zlib_score(out["avg_nll"][:answer_rows], texts)
    return out


def _gradnorms(model: Any, rows: list[tuple[Tensor, Tensor]], batch_size: int, device: torch.device, p: float,
               pad_id: int) -> Tensor:
    order = sorted(range(len(rows)), key=lambda i: int(rows[i][0].numel()))
    scores = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids, labels, mask = _pad_right([rows[i] for i in chosen], pad_id)
        scores[torch.tensor(chosen)] = gradnorm_score(model, ids.to(device), labels.to(device), mask.to(device),
                                                      p=p).double().cpu()
    return scores


def _sharded_gradnorms(model: nn.Module, rows: list[tuple[Tensor, Tensor]], device: torch.device, p: float,
                       pad_id: int) -> Tensor:
    """:func:`gradnorm_score` of each row on a model sharded with FSDP2.

    A sharded backward is collective and FSDP2 averages its gradients over the ranks, so the ranks
    take turns: at turn ``(i, owner)`` every rank forwards its ``i``-th row (a padding row past its
    share) and backpropagates ``world · loss`` on the owner and zero elsewhere, which leaves the
    owner's per-sample gradient in the shards (through :func:`compute_gradients`, ``.grad`` kept);
    its per-tensor ``p``-norms are reduced over the shards (:func:`global_norms`). Every rank runs
    ``world ×`` the longest share's count of forward/backward pairs, one row each (GradNorm's
    official code forwards one sample at a time too). A trainable tensor the loss does not reach
    counts with norm 0 here (:func:`gradnorm_score` leaves it out of the mean).
    """
    import torch.distributed as dist

    from lightning_forget.gradients import compute_gradients
    from lightning_forget.sharding import global_norms, reshard

    world, rank = dist.get_world_size(), dist.get_rank()
    reshard(model)  # the sharded parameters (FSDP2 keeps the root's gathered after a forward without backward)
    params = {name: q for name, q in model.named_parameters() if q.requires_grad}
    if not params:
        raise ValueError(GRADNORM_NO_PARAMETERS)
    scores = torch.empty(len(rows), dtype=torch.float64)
    for i in range(len(rows) + _padding_batches(len(rows), True)):
        mine = i < len(rows)
        ids, labels, mask = _pad_right([rows[i] if mine else (torch.tensor([pad_id, pad_id]),
                                                              torch.tensor([IGNORE_INDEX, IGNORE_INDEX]))], pad_id)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        for owner in range(world):
            with torch.enable_grad():
                if mine and owner == rank:
                    loss = gradnorm_losses(model, ids, labels, mask)[0] * world
                else:
                    output = model(input_ids=ids, attention_mask=mask)
                    loss = getattr(output, "logits", output).sum() * 0.0
                grads = compute_gradients(loss, params)
            norms = global_norms(grads, p)
            if mine and owner == rank:
                scores[i] = torch.stack(list(norms.values())).mean()
    return scores


def _generate(model: Any, tokenizer: Any, prompts: Sequence[Tensor], batch_size: int, max_new_tokens: int,
              end_id: int, device: torch.device, bar: Any, synced: bool = False) -> list[str]:
    generator = _generator_model(model)
    context = _context_length(generator)
    order = sorted(range(len(prompts)), key=lambda i: int(prompts[i].numel()))
    texts: list[str] = [""] * len(prompts)
    padding = _padding_batches(-(-len(order) // batch_size), synced)
    starts = list(range(0, len(order), batch_size)) + [-1] * padding  # -1: a padding batch (results dropped)
    for start in starts:
        chosen = order[start : start + batch_size] if start >= 0 else order[:1]
        width = max(int(prompts[i].numel()) for i in chosen)
        ids = torch.full((len(chosen), width), end_id, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):  # left padding, as open-unlearning generates
            n = int(prompts[i].numel())
            ids[row, width - n :], mask[row, width - n :] = prompts[i], 1
        new_tokens = max_new_tokens if context is None else min(max_new_tokens, context - width)
        if new_tokens < 1:
            raise ValueError(f"a prompt of {width} tokens fills the model's context of {context} tokens; nothing can "
                             "be generated. Fix: a model with a longer context, shorter prompts, or generate=False.")
        # synced (a sharded model): Hugging Face's synced_gpus decodes until every rank's batch is done
        output = generator.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                    max_new_tokens=new_tokens, pad_token_id=end_id, eos_token_id=end_id,
                                    top_p=None, top_k=None, temperature=None, synced_gpus=synced)
        if start < 0:
            continue
        for row, i in enumerate(chosen):
            generated = output[row, width:].tolist()
            if end_id in generated:  # open-unlearning cuts the text at the end token
                generated = generated[: generated.index(end_id)]
            texts[i] = tokenizer.decode(generated).strip()
        bar.update(len(chosen))
    return texts


def _split_statistics(model: Any, reference_model: Any, tokenizer: Any, name: str, records: list[Mapping[str, Any]],
                      prompts: list[str], indices: list[int], *, batch_size: int, generate: bool, max_new_tokens: int,
                      device: torch.device, k: float, gradnorm: bool, gradnorm_p: float, end_id: int,
                      bar: Any, synced: bool = False) -> dict[str, Tensor]:
    """The per-sample statistics (``(n,)`` float64 tensors and ``index``) of one split's ``indices``."""
    chosen = [records[i] for i in indices]
    chosen_prompts = [prompts[i] for i in indices]
    where = lambda i, field: f"splits[{name!r}][{indices[i]}] ({field})"  # noqa: E731
    answers = [_tokenise(tokenizer, p, r["answer"], end_id, where(i, "answer")) for i, (r, p) in
               enumerate(zip(chosen, chosen_prompts))]
    rows = list(answers)
    counts = [len(r.get("perturbed_answer", []) or []) for r in chosen]
    with_options = all(c > 0 for c in counts)
    if any(c > 0 for c in counts) and not with_options:
        raise ValueError(f"splits[{name!r}]: some records have perturbed answers and some none (counts "
                         f"{sorted(set(counts))}). Fix: give every record of a split wrong answers, or none.")
    if with_options:
        rows += [_tokenise(tokenizer, p, r.get("paraphrased_answer", r["answer"]), end_id, where(i, "paraphrased_answer"))
                 for i, (r, p) in enumerate(zip(chosen, chosen_prompts))]
        rows += [_tokenise(tokenizer, p, w, end_id, where(i, "perturbed_answer")) for i, (r, p) in
                 enumerate(zip(chosen, chosen_prompts)) for w in r["perturbed_answer"]]
    n = len(chosen)
    texts = [tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) for _, labels in answers]
    with torch.no_grad():
        forward = _forward_rows(model, rows, n, batch_size, device, k, end_id, texts, synced)
    stats: dict[str, Tensor] = {"index": torch.tensor(indices, dtype=torch.float64)}
    stats["avg_nll"] = forward["avg_nll"][:n]
    stats["probability"] = torch.exp(-stats["avg_nll"])
    for key in ("exact_memorization", "extraction_strength", "min_k", "min_k_plus_plus", "zlib"):
        stats[key] = forward[key] if n else torch.empty(0, dtype=torch.float64)
    if with_options:
        stats["paraphrased_avg_nll"] = forward["avg_nll"][n : 2 * n]
        owners = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
        wrong = forward["avg_nll"][2 * n :]
        size = torch.tensor(counts, dtype=torch.float64)
        mean_wrong = torch.zeros(n, dtype=torch.float64).index_add_(0, owners, wrong) / size
        sum_wrong_prob = torch.zeros(n, dtype=torch.float64).index_add_(0, owners, torch.exp(-wrong))
        stats["perturbed_avg_nll"] = mean_wrong
        stats["truth_ratio"] = truth_ratio(stats["paraphrased_avg_nll"], mean_wrong)
        stats["probability_normalised"] = normalised_probability(stats["probability"], sum_wrong_prob)
    if gradnorm and name in ("forget", "holdout") and synced:  # every rank joins, with or without rows
        stats["gradnorm"] = _sharded_gradnorms(model, answers, device, gradnorm_p, end_id)
    elif gradnorm and name in ("forget", "holdout") and n:
        stats["gradnorm"] = _gradnorms(model, answers, batch_size, device, gradnorm_p, end_id)
    if reference_model is not None and name in ("forget", "holdout") and (n or synced):
        with torch.no_grad():
            stats["reference_avg_nll"] = _forward_rows(reference_model, answers, 0, batch_size, device, k, end_id,
                                                       [], synced)["avg_nll"]
    if generate and name != "holdout":
        prompt_ids = [ids[labels == IGNORE_INDEX] for ids, labels in answers]
        with torch.no_grad():
            generations = _generate(model, tokenizer, prompt_ids, batch_size, max_new_tokens, end_id, device, bar, synced)
        stats["rouge_l"] = torch.tensor([rouge_l_recall(g, t.strip()) for g, t in zip(generations, texts)],
                                        dtype=torch.float64)
    return stats


# ---------------------------------------------------------------------------------- gather
def _default_all_gather(tensor: Tensor) -> Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("evaluate_lm_unlearning(world_size>1) needs `all_gather=` or an initialised "
                           "torch.distributed process group. Fix: pass trainer.strategy.all_gather.")
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def _gather(local: dict[str, dict[str, Tensor]], all_gather: Callable[[Tensor], Tensor],
            device: torch.device) -> dict[str, dict[str, Tensor]]:
    """One collective for every split: rows ``[split id, stats...]`` of equal count on every rank."""
    columns = {name: sorted(s) for name, s in local.items()}
    blocks = []
    for split_id, (name, stats) in enumerate(local.items()):
        n = int(stats["index"].numel())
        block = torch.empty((n, 1 + len(columns[name])), dtype=torch.float64)
        block[:, 0] = split_id
        for c, key in enumerate(columns[name]):
            block[:, 1 + c] = stats[key]
        blocks.append(block.reshape(-1))
    flat = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.float64)
    gathered = all_gather(flat.to(device)).reshape(-1, flat.numel()).cpu()  # (world, size)
    out: dict[str, dict[str, Tensor]] = {}
    offset = 0
    for name, stats in local.items():
        n, width = int(stats["index"].numel()), 1 + len(columns[name])
        part = gathered[:, offset : offset + n * width].reshape(-1, width)
        offset += n * width
        out[name] = {key: part[:, 1 + c] for c, key in enumerate(columns[name])}
    return out


def _deduplicate(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    keys = [k for k in stats if k != "index"]
    unique, *values = deduplicate_by_index(stats["index"].long(), *(stats[k] for k in keys))
    return {"index": unique.double(), **dict(zip(keys, values))}


# ---------------------------------------------------------------------------------- global
def _mean(values: Optional[Tensor]) -> Optional[float]:
    return float(values.mean()) if values is not None and values.numel() else None


def _global_metrics(per_sample: dict[str, dict[str, Tensor]], retain: Optional[dict[str, Any]],
                    generate: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, stats in per_sample.items():
        result[f"{name}_probability"] = _mean(stats.get("probability"))
        if "rouge_l" in stats:
            result[f"{name}_rouge_l"] = _mean(stats["rouge_l"])
        if "truth_ratio" in stats:
            aggregator = "closer_to_1_better" if name == "forget" else "true_better"
            result[f"{name}_truth_ratio"] = truth_ratio_score(stats["truth_ratio"], aggregator)
            result[f"{name}_probability_normalised"] = _mean(stats["probability_normalised"])
    forget = per_sample["forget"]
    result["extraction_strength"] = _mean(forget["extraction_strength"])
    result["exact_memorization"] = _mean(forget["exact_memorization"])
    holdout = per_sample.get("holdout")
    scores = {"loss": "avg_nll", "zlib": "zlib", "min_k": "min_k", "min_k_plus_plus": "min_k_plus_plus",
              "gradnorm": "gradnorm"}
    for attack in MIA_ATTACKS:
        result[f"mia_{attack}"] = None
        if holdout is None or not holdout["index"].numel():
            continue
        if attack == "reference":
            if "reference_avg_nll" in forget:
                result["mia_reference"] = membership_auc(
                    reference_score(forget["avg_nll"], forget["reference_avg_nll"]),
                    reference_score(holdout["avg_nll"], holdout["reference_avg_nll"]))
        elif scores[attack] in forget:
            result[f"mia_{attack}"] = membership_auc(forget[scores[attack]], holdout[scores[attack]])
    retain_auc = 0.5
    if retain is not None and retain["metrics"].get("mia_min_k") is not None:
        retain_auc = float(retain["metrics"]["mia_min_k"])
    result["privacy_leakage"] = (privacy_leakage(result["mia_min_k"], retain_auc)
                                  if result["mia_min_k"] is not None else None)
    result["forget_quality"] = None
    if retain is not None and "truth_ratio" in forget:
        theirs = retain["per_sample"].get("forget", {}).get("truth_ratio")
        if theirs:
            result["forget_quality"] = forget_quality(forget["truth_ratio"], torch.tensor(theirs, dtype=torch.float64))
    terms = []
    for name, prob_key in (("retain", "retain_probability"), ("world_facts", "world_facts_probability_normalised")):
        if name in per_sample and per_sample[name]["index"].numel():
            terms += [prob_key] + ([f"{name}_rouge_l"] if generate else []) + [f"{name}_truth_ratio"]
    values = [result.get(t) for t in terms]
    result["model_utility"] = model_utility(values) if terms and all(v is not None for v in values) else None
    result["model_utility_terms"] = terms
    return result


def _check_compatible(retain: dict[str, Any], hashes: dict[str, str]) -> None:
    theirs = retain.get("data_hash", {})
    for name in ("forget", "holdout"):
        if name in theirs and name in hashes and theirs[name] != hashes[name]:
            raise ValueError(f"retain_stats were computed on another {name!r} split (data hash {theirs[name][:12]}… "
                             f"vs {hashes[name][:12]}…). Fix: evaluate the retain model on the same splits and "
                             "tokenizer, or pass retain_stats=None.")


# ---------------------------------------------------------------------------------- entry point
def evaluate_lm_unlearning(
    model: nn.Module,
    splits: Mapping[str, Any],
    tokenizer: Any,
    *,
    retain_stats: Optional[Union[str, os.PathLike, Mapping[str, Any]]] = None,
    reference_model: Optional[Callable[..., Any]] = None,
    batch_size: int = 16,
    generate: bool = True,
    max_new_tokens: int = 200,
    device: Optional[Union[str, torch.device]] = None,
    k: float = 0.4,
    gradnorm: bool = True,
    gradnorm_p: float = 2.0,
    prompt_format: str = DEFAULT_PROMPT,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    all_gather: Optional[Callable[[Tensor], Tensor]] = None,
) -> dict[str, Any]:
    """open-unlearning's TOFU metrics of ``model`` on QA ``splits``, batched, optionally sharded across ranks.

    See the module docstring for each metric's computation and the deviations.

    Args:
        model: a Hugging Face causal LM, or a module called as ``model(input_ids=...,
            attention_mask=...)`` returning logits (``CausalLMModule``); generation uses its
            ``.generate`` (or its ``.model``'s). A LightningModule without ``forward`` is evaluated
            through its ``.model`` (a user's module keeping the HF model there). Evaluated in eval mode
            (its mode restored after).
        splits: ``{"forget": ..., "retain": ..., "holdout": ..., "world_facts": ...}`` (``forget``
            required), each a :class:`~lightning_forget.datamodules.QADataset` (its records and
            prompts) or a list of records with ``question``, ``answer`` and, for Truth Ratios,
            ``paraphrased_answer`` and ``perturbed_answer`` (a list).
        tokenizer: ``encode(text) -> ids``, ``decode(ids) -> text`` and ``eos_id`` (the end id
            appended to each answer), e.g. :class:`~lightning_forget.datamodules.ByteTokenizer`.
        retain_stats: what this function returned on the retain model (or the path of that dict
            as JSON): gives forget quality and the retain AUC of privacy leakage.
        reference_model: a callable like ``model`` (e.g. :class:`~lightning_forget.unlearning.ReferenceModel`
            of the model before unlearning) for the reference-based attack; ``None``: not computed.
        batch_size: rows per forward and per generation batch.
        generate: generate greedily for ROUGE-L (the slowest part); ``False`` leaves ROUGE out
            (and out of model utility).
        max_new_tokens: generation length (200 in TOFU; capped by the model's context).
        device: where the inputs go (default: the model's parameters' device).
        k: the share of lowest tokens of Min-K and Min-K++ (0.4 in TOFU).
        gradnorm: compute the GradNorm attack (a backward per forget/holdout sample; on a model sharded
            with FSDP2 every rank runs world size × its longest share of them, in turns, as a sharded
            backward averages over the ranks).
        gradnorm_p: its norm (2 in TOFU).
        prompt_format: the prompt of records given as dicts (``{question}`` is replaced).
        progress: a progress bar over generation (on rank 0).
        rank: this process's rank (see the module docstring).
        world_size: the number of processes sharing the evaluation.
        all_gather: ``tensor -> (world_size, *tensor.shape)`` (e.g. ``trainer.strategy.all_gather``);
            default: ``torch.distributed.all_gather`` when ``world_size > 1``.

    Returns:
        A JSON-serialisable dict: ``metrics`` (``forget_quality``, ``model_utility``,
        ``model_utility_terms``, ``privacy_leakage``, ``extraction_strength``,
        ``exact_memorization``, ``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``,
        ``mia_gradnorm``, ``mia_reference``, and per split ``<split>_probability``,
        ``<split>_rouge_l``, ``<split>_truth_ratio``, ``<split>_probability_normalised``; ``None``
        where not computable), ``per_sample`` (``{split: {statistic: [values in index order],
        "index": [...]}}``), ``data_hash`` (per split) and ``settings``.

    Raises:
        TypeError, ValueError: bad arguments or records (named); retain statistics of other data.
    """
    _check_splits(splits)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}. Fix: 200 as TOFU.")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank and world_size must satisfy 0 <= rank < world_size, got rank={rank!r}, "
                         f"world_size={world_size!r}.")
    if not (isinstance(k, (int, float)) and 0 < k <= 1):
        raise ValueError(f"k must be in (0, 1], got {k!r}. Fix: the share of lowest tokens of Min-K, e.g. k=0.4.")
    if gradnorm_p not in (1, 2, float("inf")):
        raise ValueError(f"gradnorm_p must be 1, 2 or inf, got {gradnorm_p!r}. Fix: gradnorm_p=2 (TOFU, MUSE).")
    end_id = getattr(tokenizer, "eos_id", None)
    if not isinstance(end_id, int):
        raise ValueError(f"tokenizer must have an int eos_id (the end id after each answer), got {end_id!r} from "
                         f"{type(tokenizer).__name__}. Fix: a tokenizer with an end-of-sequence token.")
    retain = load_stats(retain_stats) if retain_stats is not None else None
    model = _callable_model(model)
    device = torch.device(device) if device is not None else _device_of(model)
    prepared = {name: _split_records(name, data, prompt_format) for name, data in splits.items()}
    empty = [name for name, (records, _) in prepared.items() if not records]
    if empty:
        raise ValueError(f"splits {empty} hold no records. Fix: leave empty splits out of `splits`.")
    hashes = split_hashes(splits, tokenizer, prompt_format)
    if retain is not None:
        _check_compatible(retain, hashes)

    from tqdm.auto import tqdm

    shards = {name: shard_indices(len(records), rank, world_size) for name, (records, _) in prepared.items()}
    # A model sharded with FSDP2: its forwards are collective, so every rank runs as many (padding ones
    # where its share is shorter) and generation decodes until every rank is done.
    synced = world_size > 1 and isinstance(model, nn.Module) and is_sharded(model)
    total = sum(len(shards[n]) for n in shards if n != "holdout") if generate else 0
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=total, desc="Generating (ROUGE-L)", disable=not (progress and generate and rank == 0),
                  leave=False) as bar:
            local = {name: _split_statistics(model, reference_model, tokenizer, name, records, prompts, shards[name],
                                             batch_size=batch_size, generate=generate, max_new_tokens=max_new_tokens,
                                             device=device, k=k, gradnorm=gradnorm, gradnorm_p=gradnorm_p,
                                             end_id=end_id, bar=bar, synced=synced)
                     for name, (records, prompts) in prepared.items()}
    finally:
        model.train(was_training)
    if world_size > 1:
        local = _gather(local, all_gather or _default_all_gather, device)
    per_sample = {name: _deduplicate(stats) for name, stats in local.items()}
    metrics = _global_metrics(per_sample, retain, generate)
    return {
        "metrics": metrics,
        "per_sample": {name: {key: (value.long().tolist() if key == "index" else value.tolist())
                              for key, value in stats.items()} for name, stats in per_sample.items()},
        "data_hash": hashes,
        "settings": {"k": k, "generate": generate, "max_new_tokens": max_new_tokens, "gradnorm": gradnorm,
                     "gradnorm_p": gradnorm_p, "reference": reference_model is not None,
                     "prompt_format": prompt_format},
    }
