"""The one batch convention: BatchFields reads tuples, namedtuples and dicts the same way."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from lightning_forget.batch import BatchFields, MissingFieldError, logits_of

X = torch.randn(4, 3)
Y = torch.arange(4)
Sample = namedtuple("Sample", ["image", "label", "task"])


def _grown(split):  # two copies of every per-sample row, as a replay join would produce
    return {name: torch.cat([value, value]) for name, value in split.fields.items()}


def test_tuple_default_positions_and_rebuild_keeps_layout() -> None:
    split = BatchFields().split((X, Y, torch.zeros(4), 7))
    assert (split.input_name, split.target_name, split.size) == ("0", "1", 4)
    assert set(split.fields) == {"0", "1", "2"}  # the int 7 is not per-sample
    rebuilt = split.rebuild(_grown(split))
    assert type(rebuilt) is tuple and rebuilt[0].shape[0] == 8 and rebuilt[2].shape[0] == 8 and rebuilt[3] == 7
    listed = BatchFields().split([X, Y]).rebuild({"0": X, "1": Y})
    assert type(listed) is list


def test_namedtuple_by_position_or_name() -> None:
    batch = Sample(X, Y, torch.ones(4, dtype=torch.long))
    by_position = BatchFields().split(batch)
    assert (by_position.input_name, by_position.target_name) == ("image", "label")
    by_name = BatchFields(input_key="image", target_key="label").split(batch)
    rebuilt = by_name.rebuild(_grown(by_name))
    assert type(rebuilt) is Sample and rebuilt.task.shape[0] == 8


def test_dict_default_keys_and_metadata() -> None:
    batch = {"image": X, "label": Y, "path": ["a", "b", "c", "d"], "epoch": torch.tensor(3)}
    split = BatchFields().split(batch)
    assert (split.input_name, split.target_name) == ("image", "label")
    assert set(split.fields) == {"image", "label"} and split.other_per_sample == ["path"]
    rebuilt = split.rebuild(_grown(split))
    assert rebuilt["image"].shape[0] == 8 and rebuilt["epoch"] is batch["epoch"] and rebuilt["path"] is batch["path"]
    assert batch["image"].shape[0] == 4  # the user's batch is not modified


def test_errors_name_the_argument_and_list_fields() -> None:
    with pytest.raises(MissingFieldError, match=r"`input_key`=None .*\['features', 'label'\].*Fix: pass `input_key=`"):
        BatchFields(owner="ExperienceReplay").split({"features": X, "label": Y})
    with pytest.raises(MissingFieldError, match="`target_key`='y'"):
        BatchFields(target_key="y").split({"x": X, "label": Y})
    with pytest.raises(MissingFieldError, match="`input_key`=5"):
        BatchFields(input_key=5).split((X, Y))
    with pytest.raises(MissingFieldError, match="the batch is a dict"):
        BatchFields(input_key=0).split({"x": X, "y": Y})
    with pytest.raises(TypeError, match="`target_key`"):
        BatchFields(target_key=1).split((X, "not a tensor"))
    with pytest.raises(TypeError, match="`input_key` must be a str"):
        BatchFields(input_key=True)
    assert BatchFields().split({"x": X}, require_target=False).target is None


def test_logits_of_every_output_kind() -> None:
    @dataclass
    class Output:
        logits: torch.Tensor

    z = torch.randn(2, 3)
    for output in (z, {"logits": z, "loss": 0}, Output(z), (z, None)):
        assert logits_of(output) is z
    with pytest.raises(TypeError, match="Cannot find logits"):
        logits_of({"scores": z})


def test_two_stream_batches_are_read_by_stream_name() -> None:
    from lightning_forget.batch import stream_names

    batch = {"forget": (X, Y), "retain": {"image": X + 1, "label": Y}}
    assert stream_names(batch) == ["forget", "retain"]
    with pytest.raises(MissingFieldError, match=r"several streams \['forget', 'retain'\].*`stream=`"):
        BatchFields().split(batch)
    with pytest.raises(MissingFieldError, match="`stream`='other'"):
        BatchFields(stream="other").split(batch)
    split = BatchFields(stream="retain").split(batch)
    assert torch.equal(split.input, X + 1) and split.stream == "retain"
    rebuilt = split.rebuild(_grown(split))
    assert rebuilt["retain"]["image"].shape[0] == 8 and rebuilt["forget"] is batch["forget"]
    assert torch.equal(BatchFields(stream="forget").target(batch), Y)
    assert stream_names({"x": X, "y": Y}) == [] and stream_names({"x": X, "meta": ["a"] * 4}) == []
