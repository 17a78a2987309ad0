"""Left padding (the job's and evaluation's: label words last) must not change what a row scores. Models number
positions across the padded row unless given position_ids, so a left-padded row's positions depend on its
batch-mates: GPT-2's absolute position embeddings then score the same example differently. collate(...,
position_ids=True) numbers each row from its first real token, as HF's generate() does."""
import functools

import pytest
import torch

import ds_zo
from ds_zo.data.collate import collate, positions_from_mask, takes_position_ids
from ds_zo.evaluation import evaluate
from conftest import ds_config
from models import tiny_model

SHORT = {"input_ids": [5, 17, 33, 2], "labels": [-100, -100, -100, 2]}
LONG = {"input_ids": [7, 8, 9, 10, 11, 12, 13, 40, 3], "labels": [-100] * 8 + [3]}


def _more_padding(batch: dict, extra: int, pad_id: int = 0) -> dict:
    """The same rows with `extra` more pad columns on the left (positions renumbered from the mask)."""
    rows = batch["input_ids"].shape[0]
    out = {"input_ids": torch.cat([torch.full((rows, extra), pad_id), batch["input_ids"]], 1),
           "attention_mask": torch.cat([torch.zeros(rows, extra, dtype=torch.long), batch["attention_mask"]], 1),
           "labels": torch.cat([torch.full((rows, extra), -100), batch["labels"]], 1)}
    if "position_ids" in batch:
        out["position_ids"] = positions_from_mask(out["attention_mask"])
    return out


def test_positions_count_from_each_rows_first_real_token():
    b = collate([SHORT, LONG], pad_id=0, side="left", position_ids=True)
    assert b["position_ids"].tolist() == [[1] * 5 + [0, 1, 2, 3], list(range(9))]
    right = collate([SHORT, LONG], pad_id=0, position_ids=True)
    assert right["position_ids"][0].tolist() == [0, 1, 2, 3] + [1] * 5
    assert "position_ids" not in collate([SHORT], pad_id=0, side="left")
    assert takes_position_ids(tiny_model("gpt2")) and takes_position_ids(tiny_model("llama"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluation_scores_a_row_whatever_its_batch_mates(arch):
    """evaluate() with batches of 1 (no padding) and of 2 (SHORT left-padded to LONG's length): the same loss."""
    engine, *_ = ds_zo.initialize(model=tiny_model(arch), config=ds_config())
    alone = evaluate(engine, [SHORT, LONG], batch_size=1, pad_id=0, candidate_ids=[2, 3])
    together = evaluate(engine, [SHORT, LONG], batch_size=2, pad_id=0, candidate_ids=[2, 3])
    assert together["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert together["accuracy"] == alone["accuracy"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_extra_left_padding_does_not_change_the_zo_step(arch):
    """A ZO step on a left-padded batch and on the same batch with 5 more pad columns: the same loss and the same
    parameters after the update (to float32 rounding). Without position_ids GPT-2's step differs (the check can fail)."""
    def step(batch):
        engine, *_ = ds_zo.initialize(model=tiny_model(arch), config=ds_config(seed=3))
        loss = engine.train_batch(batch)
        engine.flush()
        return loss, engine.module_state_dict()

    base = collate([SHORT, LONG], pad_id=0, side="left", position_ids=True)
    loss_a, state_a = step(base)
    loss_b, state_b = step(_more_padding(base, 5))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name in state_a:
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-5, atol=1e-6, msg=name)
    if arch == "gpt2":
        plain = {k: v for k, v in base.items() if k != "position_ids"}
        loss_c, _ = step(_more_padding(plain, 5))
        assert abs(loss_c - loss_a) > 1e-3 * abs(loss_a)


def test_evaluation_gives_the_model_its_positions(monkeypatch):
    """What the model receives from evaluate(): position_ids from the mask, not None."""
    model = tiny_model("gpt2")
    seen = []
    original = model.forward

    @functools.wraps(original)      # keeps the signature takes_position_ids reads
    def spy(*args, **kwargs):
        seen.append(kwargs.get("position_ids"))
        return original(*args, **kwargs)
    engine, *_ = ds_zo.initialize(model=model, config=ds_config())
    monkeypatch.setattr(model, "forward", spy)
    evaluate(engine, [SHORT, LONG], batch_size=2, pad_id=0)
    assert seen and seen[0] is not None
    assert seen[0].tolist() == [[1] * 5 + [0, 1, 2, 3], list(range(9))]
