"""evaluate_lm_unlearning and LMUnlearningEvaluation: hand values, batched = per-sample, 2 ranks = 1, DDP, files."""

from __future__ import annotations

import functools
import json
import math
import threading
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score
from torch.utils.data import DistributedSampler

from lightning_forget.callbacks import LMUnlearningEvaluation
from lightning_forget.datamodules import FictitiousQADataModule
from lightning_forget.metrics import functional_lm as M
from lightning_forget.modules.causal_lm import CausalLMModule, build_tiny_causal_lm
from lightning_forget.unlearning.lm_eval import evaluate_lm_unlearning, shard_indices
from tests.helpers.harness import RankFingerprint, quiet_trainer

SPLITS = ("forget", "retain", "holdout", "world_facts")


def _data(**kwargs: Any) -> FictitiousQADataModule:
    # forget: 1 person x 3 questions; holdout 3; retain 9; world facts 4 (odd sizes: DDP pads by repeating)
    defaults = dict(num_people=4, questions_per_person=3, num_countries=1, num_perturbed=2, forget_percent=25,
                    batch_size=4)
    return FictitiousQADataModule(**{**defaults, **kwargs})


def _splits(dm: FictitiousQADataModule) -> dict[str, Any]:
    return {s: dm.dataset(s) for s in SPLITS}


@pytest.fixture(scope="module")
def trained() -> tuple[FictitiousQADataModule, torch.nn.Module]:
    """A tiny GPT-2 fitted a little on the forget and retain answers, so greedy generation reproduces some of them."""
    dm = _data()
    torch.manual_seed(0)
    model = build_tiny_causal_lm("gpt2", 257, dm.block_size + 16, 1, 32, 2)
    rows = [dm.dataset(s)[i] for s in ("forget", "retain") for i in range(len(dm.dataset(s)))]
    from lightning_forget.datamodules.instructions import pad_token_batch

    batch = pad_token_batch(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    return dm, model


# ---------------------------------------------------------------------------------- GradNorm by hand
class _Bigram(torch.nn.Module):
    """logits[t] = W[x_t] + b; an unused parameter gets no gradient (left out of the mean, as open-unlearning)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.W = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(vocab, generator=g, dtype=torch.float64))
        self.unused = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.W[input_ids] + self.b


def _gradnorm_by_hand(model: _Bigram, ids: list[int], labels: list[int], p: float) -> float:
    W, b = model.W.detach().numpy(), model.b.detach().numpy()
    # positions whose next label counts, but the last one (open-unlearning drops the EOS prediction)
    answer = [t for t in range(1, len(labels)) if labels[t] != -100][:-1]
    dW, db = np.zeros_like(W), np.zeros_like(b)
    for t in answer:
        x, y = ids[t - 1], labels[t]
        z = W[x] + b
        prob = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        g = prob.copy()
        g[y] -= 1.0
        dW[x] += g / len(answer)
        db += g / len(answer)
    norm = (lambda a: np.abs(a).max()) if p == float("inf") else (lambda a: (np.abs(a) ** p).sum() ** (1 / p))
    return (norm(dW) + norm(db)) / 2


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_gradnorm_matches_a_hand_computation_per_sample_in_one_batch(p: float) -> None:
    model = _Bigram(5)
    ids = torch.tensor([[0, 1, 2, 3, 4, 0], [4, 3, 2, 1, 4, 4]])
    labels = torch.tensor([[-100, -100, 2, 3, 4, 0], [-100, 3, 2, 1, -100, -100]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    model.W.grad = torch.full_like(model.W, 7.0)
    scores = M.gradnorm_score(model, ids, labels, mask, p=p)
    expected = [_gradnorm_by_hand(model, ids[i].tolist(), labels[i].tolist(), p) for i in range(2)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-10)
    assert bool((model.W.grad == 7.0).all()), "the model's gradients are left as they were"
    with pytest.raises(ValueError, match="p must be 1, 2 or inf"):
        M.gradnorm_score(model, ids, labels, mask, p=3)


def test_tokenwise_labels_drop_each_samples_last_answer_position() -> None:
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, -100, 9, 8]])
    assert M.tokenwise_labels(labels).tolist() == [[-100, 5, 6, -100, -100], [-100, -100, -100, 9, -100]]


# ---------------------------------------------------------------------------------- the evaluation by hand
def _greedy(model: torch.nn.Module, prompt: list[int], steps: int, end: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == end:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def _by_hand(model: torch.nn.Module, tok: Any, prompt: str, answer: str) -> dict[str, float]:
    p, a = tok.encode(prompt), tok.encode(answer) + [tok.eos_id]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    rows = log_probs[len(p) - 1 : len(p) - 1 + len(a)]  # predicting each answer token (EOS last)
    picked = rows[torch.arange(len(a)), torch.tensor(a)]
    avg_nll = float(-picked.mean())
    lp, dist, target = picked[:-1].numpy(), rows[:-1], a[:-1]  # token-wise: the EOS prediction dropped
    n_k = max(1, int(len(lp) * 0.4))
    mu = (dist.exp() * dist).sum(-1)
    sigma = ((dist.exp() * dist.square()).sum(-1) - mu.square()).clamp_min(1e-6).sqrt()
    z = ((torch.tensor(lp) - mu) / sigma).numpy()
    preds = dist.argmax(-1).tolist()
    k_star = len(target) - 1
    for k in range(len(target)):
        if preds[k:] == target[k:]:
            k_star = k
            break
    return {"avg_nll": avg_nll, "min_k": -float(np.sort(lp)[:n_k].mean()), "min_k_plus_plus": -float(np.sort(z)[:n_k].mean()),
            "zlib": avg_nll / len(zlib.compress(answer.encode())), "exact_memorization": float(np.mean(np.array(preds) == target)),
            "extraction_strength": 1 - k_star / len(target)}


def test_evaluation_statistics_match_hand_computations_scipy_and_sklearn(trained: Any) -> None:
    dm, model = trained
    tok = dm.tokenizer
    retain_model = build_tiny_causal_lm("gpt2", 257, dm.block_size + 16, 1, 32, 2)
    retain = evaluate_lm_unlearning(retain_model, _splits(dm), tok, batch_size=4, max_new_tokens=12, progress=False)
    result = evaluate_lm_unlearning(model, _splits(dm), tok, retain_stats=retain, reference_model=retain_model,
                                    batch_size=4, max_new_tokens=12, progress=False)
    json.dumps(result)  # plain JSON
    prompt = "Question: {question}\nAnswer: "
    per = result["per_sample"]
    for split in ("forget", "holdout"):
        for i, record in enumerate(dm.records(split)):
            hand = _by_hand(model, tok, prompt.format(question=record["question"]), record["answer"])
            for key, value in hand.items():
                assert per[split][key][i] == pytest.approx(value, rel=1e-6, abs=1e-9), (split, i, key)
            para = _by_hand(model, tok, prompt.format(question=record["question"]), record["paraphrased_answer"])
            wrong = [_by_hand(model, tok, prompt.format(question=record["question"]), w)["avg_nll"]
                     for w in record["perturbed_answer"]]
            assert per[split]["truth_ratio"][i] == pytest.approx(math.exp(-np.mean(wrong)) / math.exp(-para["avg_nll"]), rel=1e-6)
            ref = _by_hand(retain_model, tok, prompt.format(question=record["question"]), record["answer"])["avg_nll"]
            assert per[split]["reference_avg_nll"][i] == pytest.approx(ref, rel=1e-6)
    # ROUGE-L recall of a greedy generation (a plain loop without cache or padding)
    for i, record in enumerate(dm.records("forget")):
        ids = _greedy(model, tok.encode(prompt.format(question=record["question"])), 12, tok.eos_id)
        assert per["forget"]["rouge_l"][i] == pytest.approx(M.rouge_l_recall(tok.decode(ids).strip(), record["answer"]))
    # the fitted model is far more likely to give the forget answers than the untrained one (with this
    # data's 118-token context the 60 steps do not yet make greedy generation reproduce them: ROUGE-L
    # is checked against the plain loop above, sample by sample)
    assert result["metrics"]["forget_probability"] > 10 * retain["metrics"]["forget_probability"]
    # global statistics against scipy and scikit-learn on the per-sample values
    m = result["metrics"]
    assert m["forget_quality"] == pytest.approx(ks_2samp(per["forget"]["truth_ratio"], retain["per_sample"]["forget"]["truth_ratio"]).pvalue)
    labels = [0] * len(per["forget"]["index"]) + [1] * len(per["holdout"]["index"])
    for attack, key in (("loss", "avg_nll"), ("zlib", "zlib"), ("min_k", "min_k"), ("min_k_plus_plus", "min_k_plus_plus"),
                        ("gradnorm", "gradnorm")):
        assert m[f"mia_{attack}"] == pytest.approx(roc_auc_score(labels, per["forget"][key] + per["holdout"][key])), attack
    ref_scores = [a - b for s in ("forget", "holdout") for a, b in zip(per[s]["avg_nll"], per[s]["reference_avg_nll"])]
    assert m["mia_reference"] == pytest.approx(roc_auc_score(labels, ref_scores))
    r = retain["metrics"]["mia_min_k"]
    assert m["privacy_leakage"] == pytest.approx(((1 - m["mia_min_k"]) - (1 - r)) / (1 - r + 1e-10) * 100)
    utility = [m["retain_probability"], m["retain_rouge_l"], m["retain_truth_ratio"],
               m["world_facts_probability_normalised"], m["world_facts_rouge_l"], m["world_facts_truth_ratio"]]
    from scipy.stats import hmean

    assert m["model_utility"] == pytest.approx(hmean(utility) if min(utility) > 0 else 0.0)
    assert m["extraction_strength"] == pytest.approx(np.mean(per["forget"]["extraction_strength"]))
    assert m["retain_truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - np.array(per["retain"]["truth_ratio"]))))
    assert m["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(per["forget"]["truth_ratio"],
                                                                       1 / (np.array(per["forget"]["truth_ratio"]) + 1e-10))))
    # a per-sample loop (batch size 1) gives the same values as the batched evaluation
    single = evaluate_lm_unlearning(model, _splits(dm), tok, retain_stats=retain, reference_model=retain_model,
                                    batch_size=1, max_new_tokens=12, progress=False)
    for split in SPLITS:
        for key, values in per[split].items():
            assert single["per_sample"][split][key] == pytest.approx(values, rel=1e-5, abs=1e-7), (split, key)


# ---------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("n,world", [(1, 2), (3, 2), (7, 3), (4, 4), (2, 5)])
def test_shards_are_those_of_a_distributed_sampler(n: int, world: int) -> None:
    for rank in range(world):
        sampler = DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=False)
        assert shard_indices(n, rank, world) == list(sampler)


def _assert_same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert set(a) == set(b)
    for key, value in b.items():
        if isinstance(value, float):
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        else:
            assert a[key] == value, key


def _two_ranks_in_threads(fn: Any) -> list[Any]:
    """Run ``fn(rank, all_gather)`` as two ranks in threads whose all_gather meets at a barrier."""
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        slots[rank_of[threading.get_ident()]] = t.clone()
        barrier.wait()
        out = torch.stack(slots)  # type: ignore[arg-type]
        barrier.wait()
        return out

    rank_of: dict[int, int] = {}

    def run(rank: int) -> None:
        rank_of[threading.get_ident()] = rank
        results[rank] = fn(rank, all_gather)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_ranks_give_the_single_process_result_after_deduplication(trained: Any) -> None:
    dm, model = trained
    kwargs = dict(batch_size=2, max_new_tokens=3, progress=False)
    single = evaluate_lm_unlearning(model, _splits(dm), dm.tokenizer, **kwargs)
    ranks = _two_ranks_in_threads(lambda rank, gather: evaluate_lm_unlearning(
        model, _splits(dm), dm.tokenizer, rank=rank, world_size=2, all_gather=gather, **kwargs))
    for result in ranks:
        for split in SPLITS:
            assert result["per_sample"][split]["index"] == list(range(len(dm.records(split))))
            for key, values in single["per_sample"][split].items():
                assert result["per_sample"][split][key] == pytest.approx(values, rel=1e-4, abs=1e-6), (split, key)
        _assert_same_metrics(result["metrics"], single["metrics"])


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(trained: Any, tmp_path: Path) -> None:
    dm, model = trained
    tok = dm.tokenizer
    with pytest.raises(ValueError, match="needs a 'forget' split"):
        evaluate_lm_unlearning(model, {"retain": dm.dataset("retain")}, tok)
    with pytest.raises(ValueError, match="unknown names"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget"), "test": []}, tok)
    with pytest.raises(ValueError, match="hold no records"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget"), "world_facts": []}, tok)
    with pytest.raises(TypeError, match="splits\\['forget'\\] must be a QADataset or a list"):
        evaluate_lm_unlearning(model, {"forget": "forget.json"}, tok)
    with pytest.raises(ValueError, match="has no tokens"):
        evaluate_lm_unlearning(model, {"forget": [{"question": "q", "answer": ""}]}, tok, generate=False)
    with pytest.raises(ValueError, match="some records have perturbed answers and some none"):
        evaluate_lm_unlearning(model, {"forget": [{"question": "q", "answer": "a", "perturbed_answer": ["b"]},
                                                  {"question": "r", "answer": "c"}]}, tok, generate=False)
    with pytest.raises(ValueError, match="retain_stats=.* is not a file"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget")}, tok, retain_stats=str(tmp_path / "none.json"))
    other = evaluate_lm_unlearning(model, {"forget": dm.records("retain")[:2]}, tok, generate=False, gradnorm=False)
    with pytest.raises(ValueError, match="retain_stats were computed on another 'forget' split"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget")}, tok, retain_stats=other, generate=False)
    with pytest.raises(ValueError, match="eos_id"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget")}, type("T", (), {"eos_id": None})())
    with pytest.raises(ValueError, match="rank and world_size"):
        evaluate_lm_unlearning(model, {"forget": dm.dataset("forget")}, tok, rank=2, world_size=2)
    with pytest.raises(TypeError, match="generate=True needs a Hugging Face causal LM"):
        evaluate_lm_unlearning(_Bigram(257), {"forget": dm.dataset("forget")}, tok, gradnorm=False)
    for kwargs, match in (({"every_n_epochs": 0}, "every_n_epochs"), ({"splits": ["retain"]}, "splits"),
                          ({"score_weights": {"accuracy": 1.0}}, "score_weights"),
                          ({"score_weights": {"forget_quality": 1.0}}, "without forget_quality when no retain"),
                          ({"save_best": True}, "save_best"), ({"retain_model": str(tmp_path / "nope")}, "retain_model"),
                          ({"k": 0}, "k")):
        with pytest.raises((ValueError, TypeError), match=match):
            LMUnlearningEvaluation(**kwargs)


# ---------------------------------------------------------------------------------- the callback, 1 and 2 processes
def _module(dm: FictitiousQADataModule, lr: float) -> CausalLMModule:
    pl.seed_everything(0)
    return CausalLMModule(n_layer=1, n_embd=16, n_head=2, block_size=dm.block_size + 8,
                          optimizer=functools.partial(torch.optim.SGD, lr=lr))


def _callback(retain_dir: Path, **kwargs: Any) -> LMUnlearningEvaluation:
    return LMUnlearningEvaluation(retain_model=str(retain_dir), batch_size=2, max_new_tokens=3, progress=False,
                                  score_weights={"forget_quality": 0.5, "model_utility": 0.5, "mia_loss": -1.0}, **kwargs)


def test_callback_under_ddp_equals_one_process_caches_retain_stats_versions_files_and_keeps_the_best(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = _data(phase="target")
    torch.manual_seed(1)
    retain_dir = tmp_path / "retain_model"
    build_tiny_causal_lm("gpt2", 257, dm.block_size + 8, 1, 16, 2).save_pretrained(retain_dir)
    # 2 processes, learning rate 0 (the model stays as it was): the retain statistics are computed in the
    # run (both ranks) and cached beside the model; one evaluation, at the epoch's end
    callback = _callback(retain_dir, before=False)
    out = str(tmp_path / "ranks.json")
    trainer = quiet_trainer(tmp_path, [callback, RankFingerprint(callback, out)], max_epochs=1, limit_train_batches=1,
                            limit_val_batches=0, devices=2, strategy="ddp_spawn")
    trainer.fit(_module(dm, lr=0.0), datamodule=dm)
    ranks = json.loads(Path(out).read_text())
    assert ranks["equal_length"] and ranks["max_state_diff"] == 0.0, ranks
    ddp_rows = json.loads((tmp_path / "lm_unlearning_metrics.json").read_text())
    assert [r["epoch"] for r in ddp_rows] == [0]
    caches = list(retain_dir.glob("lm_eval_retain_stats-*.json"))
    assert len(caches) == 1
    cached = json.loads(caches[0].read_text())
    from transformers import AutoModelForCausalLM

    retain_model = AutoModelForCausalLM.from_pretrained(retain_dir, local_files_only=True)
    direct = evaluate_lm_unlearning(retain_model, _splits(dm), dm.tokenizer, batch_size=2, max_new_tokens=3,
                                    gradnorm=False, progress=False)
    for split in SPLITS:
        for key, values in direct["per_sample"][split].items():
            assert cached["per_sample"][split][key] == pytest.approx(values, rel=1e-4, abs=1e-6), (split, key)

    # 1 process, same folder, 2 epochs of training: the cache is reused (the retain model is never loaded),
    # the files are versioned beside the first run's, and the best epoch by the score is kept
    def never(*args: Any) -> Any:
        raise AssertionError("the cached retain statistics should have been reused")

    monkeypatch.setattr(LMUnlearningEvaluation, "_load_retain_model", never)
    first_run = {p.name: p.read_bytes() for p in tmp_path.glob("lm_unlearning_metrics.*")}
    callback = _callback(retain_dir, save_best=True)
    monitor = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="lm/score", mode="max")
    trainer = quiet_trainer(tmp_path, [callback, monitor], max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                            enable_checkpointing=True)
    trainer.fit(_module(dm, lr=0.5), datamodule=dm)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("lm_unlearning_metrics.*")} == first_run
    rows = json.loads((tmp_path / "lm_unlearning_metrics-v1.json").read_text())
    assert (tmp_path / "lm_unlearning_metrics-v1.png").stat().st_size > 0
    assert (tmp_path / "lm_unlearning_metrics-v1.csv").read_text().splitlines()[0].startswith("task,epoch,")
    # before training the models are the same: the 2-process metrics equal the single-process ones
    assert rows[0]["epoch"] == "before"
    # Before training the reference (the model at the task start) is the model itself: the reference
    # attack's scores are 0 up to float32 rounding of separate forwards, and its AUC ranks that rounding.
    before, ddp_before = dict(rows[0]), dict(ddp_rows[0])
    for row in (before, ddp_before):
        assert abs(row.pop("mia_reference") - 0.5) <= 0.5
    _assert_same_metrics({**before, "epoch": 0}, ddp_before)
    scores = [r["score"] for r in rows[1:]]
    assert len(set(scores)) > 1, "training changes the score"
    best_epoch = int(np.argmax(scores))
    best = torch.load(tmp_path / "lm_unlearning_best.ckpt", weights_only=False)
    assert best["epoch"] == best_epoch
    assert float(monitor.best_model_score) == pytest.approx(max(scores))
    assert trainer.callback_metrics["lm/score"].item() == pytest.approx(scores[-1])
    assert callback.best_score == pytest.approx(max(scores))
