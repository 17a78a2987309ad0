"""The token loss: the cross-entropy from logits read a tile at a time, whole or streamed block by block."""
import copy
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import ds_zo
from ds_zo.loss import IGNORE_INDEX, CPU_VOCAB_WINDOW, StreamedTokenLoss, token_loss_sum
from conftest import ds_config
from models import VOCAB, batch, tiny_model
from reference import MeZOReference


def _logits_and_labels(rows=3, length=40, vocab=5 * CPU_VOCAB_WINDOW + 123, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[0, :5] = IGNORE_INDEX            # padding
    labels[2, 17] = IGNORE_INDEX
    return logits, labels


def _float64_reference(logits, labels):
    per_token = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(),
                                ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum().item(), int((labels[:, 1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize("scale, shift", [(4.0, 0.0), (30.0, 5e3), (1e-3, -7.0)])
def test_token_loss_is_the_cross_entropy_to_float32_rounding(scale, shift):
    """Several vocabulary windows and tiles, ignored labels, large, offset and tiny logits: each position's loss is
    the float64 cross-entropy of the same float32 logits to float32 rounding of its log-sum-exp's small part (the
    window maxima are carried exactly), at least as close as torch's float32 cross-entropy (HF's)."""
    logits, labels = _logits_and_labels(scale=scale)
    logits = logits + shift
    total, count = token_loss_sum(logits, labels)
    ref_total, ref_count = _float64_reference(logits, labels)
    assert count == ref_count == 3 * 39 - 4 - 1     # labels[0, 0] is never a target
    hf = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").double().sum().item()
    assert abs(total - ref_total) <= 2e-6 * count + 1e-6 * abs(ref_total)
    assert abs(total - ref_total) <= abs(hf - ref_total) + 2e-6 * count


def _blocks_of(vocab, rng):
    """Output-layer blocks as the streamed layer makes them: each starts at a multiple of 64 rows."""
    c0 = 0
    while c0 < vocab:
        c1 = min(vocab, c0 + 64 * rng.choice([1, 11, 21, 32, 97]))
        yield c0, c1
        c0 = c1


@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_blocks_give_the_whole_logits_value_bit_for_bit(threads):
    """Blocks of several widths, straddling the windows, for two slots: each slot's loss is token_loss_sum of its
    whole logits exactly, so the engine's loss does not depend on how the output layer cuts its blocks."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, labels = _logits_and_labels()
        g = torch.Generator().manual_seed(threads)
        vocab = 5 * CPU_VOCAB_WINDOW + 123
        x = [torch.randn(3, 40, 24, generator=g) for _ in range(2)]
        weight = torch.randn(vocab, 24, generator=g)
        sink = StreamedTokenLoss(labels, 2, vocab, torch.device("cpu"))
        for c0, c1 in _blocks_of(vocab, random.Random(threads)):
            for s in range(2):
                sink.add_matmul(s, c0, x[s], weight[c0:c1])
        assert sink.complete and sink.placeholder.device.type == "meta"
        assert sink.placeholder.shape == (6, 40, vocab)
        assert sink.results() == [token_loss_sum(F.linear(x[s], weight), labels) for s in range(2)]
    finally:
        torch.set_num_threads(before)


def test_accelerator_tiling_streamed_equals_whole_and_the_cross_entropy(monkeypatch):
    """The tiling logits on a GPU get (windows of 8192 columns, tiles of 2^23 logits), here on CPU tensors: blocks
    streamed into the windows give the whole logits' value bit for bit, and it is the float64 cross-entropy to
    float32 rounding; in bf16 with two slots, which share one float32 tile, each slot's value is its whole logits'.
    (On a GPU the output layer streams by default.)"""
    import ds_zo.loss as loss
    device_tiling = loss.loss_tiling(torch.device("cuda"), 20000)
    assert device_tiling == (loss.DEVICE_VOCAB_WINDOW, (1 << 23) // loss.DEVICE_VOCAB_WINDOW)
    assert loss.loss_tiling(torch.device("cuda"), 300) == (300, (1 << 23) // 300)
    real = loss.loss_tiling
    monkeypatch.setattr(loss, "loss_tiling", lambda device, vocab: real(torch.device("cuda"), vocab))
    vocab = 2 * loss.DEVICE_VOCAB_WINDOW + 123
    logits, labels = _logits_and_labels(vocab=vocab)
    total, count = token_loss_sum(logits, labels)
    ref_total, _ = _float64_reference(logits, labels)
    assert abs(total - ref_total) <= 2e-6 * count + 1e-6 * abs(ref_total)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 24, generator=g)
    weight = torch.randn(vocab, 24, generator=g)
    sink = StreamedTokenLoss(labels, 1, vocab, torch.device("cpu"))
    assert sink.window == loss.DEVICE_VOCAB_WINDOW
    for c0, c1 in _blocks_of(vocab, random.Random(5)):
        sink.add_matmul(0, c0, x, weight[c0:c1])
    assert sink.results() == [token_loss_sum(F.linear(x, weight), labels)]
    xs, w16 = [(x + s).bfloat16() for s in range(2)], weight.bfloat16()
    sink = StreamedTokenLoss(labels, 2, vocab, torch.device("cpu"))
    for c0, c1 in _blocks_of(vocab, random.Random(6)):
        for s in range(2):
            sink.add_matmul(s, c0, xs[s], w16[c0:c1])
    assert sink.results() == [token_loss_sum(F.linear(xs[s], w16), labels) for s in range(2)]
    tiles = [p._scratch["tile"] for p in sink.parts]
    assert tiles[0] is tiles[1] and tiles[0].dtype == torch.float32           # one float32 tile for both slots


def test_blocks_out_of_order_and_incomplete_losses_are_refused():
    _, labels = _logits_and_labels(vocab=300)
    x, weight = torch.randn(3, 40, 8), torch.randn(300, 8)
    sink = StreamedTokenLoss(labels, 1, 300, torch.device("cpu"))
    sink.add_matmul(0, 0, x, weight[:128])
    with pytest.raises(RuntimeError, match="block at column 192, expected 128"):
        sink.add_matmul(0, 192, x, weight[192:])
    assert not sink.complete
    with pytest.raises(RuntimeError, match="has seen"):
        sink.results()


class _HalvedLogitsLlama(LlamaForCausalLM):
    """A model whose forward transforms the output layer's output (as soft-capping or logit scaling models do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_zo_step_holds_no_logits_and_a_model_transforming_them_gets_whole_logits():
    """Llama: the output layer hands its blocks to the loss (the engine's kept-logits buffer is never made). A model
    that rescales the output layer's output returns something else than the layer's placeholder: the engine notices,
    runs the forward again with whole logits, and from then on always does; the steps are the reference's."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, eps=1e-3, seed=3))
    engine.train_batch(batch())
    assert engine._stream_loss and engine.copies.buffers.nbytes("output:") == 0

    base = tiny_model("llama")
    model = _HalvedLogitsLlama(base.config)
    model.load_state_dict(base.state_dict())
    ref = MeZOReference(copy.deepcopy(model), lr=1e-2, eps=1e-3, seed=3)
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, eps=1e-3, seed=3))
    for t in range(2):
        loss = engine.train_batch(batch(seed=t))
        ref_loss, ref_g = ref.step(batch(seed=t))
        assert not engine._stream_loss
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert engine.last_projected_grad == pytest.approx(ref_g[0], rel=1e-5)


def test_engine_losses_are_the_float64_cross_entropy_to_float32_rounding():
    """The engine's L± (the streamed output layer's losses) against a plain loop whose loss is the float64
    cross-entropy of its own logits: equal to float32 rounding."""
    model = tiny_model("llama")
    ref = MeZOReference(copy.deepcopy(model), lr=1e-2, eps=1e-3, seed=3, token_loss=_float64_reference)
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, eps=1e-3, seed=3))
    for t in range(2):
        assert engine.train_batch(batch(seed=t)) == pytest.approx(ref.step(batch(seed=t))[0], rel=1e-6)
    assert engine._stream_loss


@pytest.mark.parametrize("bad", [VOCAB, 500, -1])
def test_a_target_outside_the_vocabulary_is_an_error_not_a_silent_loss(bad):
    """A label that is neither -100 nor a token id matches no logit: its loss would be log Σ exp(x) alone, counted as a
    token (HF's loss raises). The whole-logits loss and the streamed one (a ZO step) both refuse it, naming it; the
    step is not taken."""
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    labels[1, 3] = bad
    with pytest.raises(IndexError, match=rf"outside the vocabulary \[0, {VOCAB}\) and not -100.*\[{bad}\]"):
        token_loss_sum(logits, labels)
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(lr=1e-2, seed=1))
    b = batch()
    b["labels"] = b["input_ids"].clone()
    b["labels"][0, 2] = bad
    with pytest.raises(IndexError, match="outside the vocabulary"):
        engine.train_batch(b)
    assert engine.global_steps == 0 and not engine.step_log
