"""Numerical faults: a non-finite L+ or L- skips the update; too many in a row abort clearly."""
import copy
import math

import pytest
import torch

import ds_zo
from ds_zo.engine import NonFiniteLossError
from ds_zo.replay import replay
from conftest import ds_config
from models import batch, tiny_model


class _Poison:
    """Makes the output layer's input NaN on chosen calls (a stand-in for an overflow in a real run), so its logits
    are NaN whether the loss reads them whole or block by block."""

    def __init__(self, model, bad_calls):
        self.calls, self.bad = 0, set(bad_calls)
        model.lm_head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        return (args[0] * float("nan"),) + args[1:] if self.calls in self.bad else None


def test_non_finite_loss_skips_the_update_and_replay_still_matches():
    model = tiny_model("llama", tied=False)
    base = copy.deepcopy(model)
    engine, *_ = ds_zo.initialize(model=model, config=ds_config(lr=1e-2, wd=0.1, seed=1, max_consecutive_skips=3))
    poison = _Poison(engine.module, bad_calls={2})           # the second step's forward
    losses, applied = [], []
    for t in range(4):
        losses.append(engine.train_batch(batch(seed=t)))
        applied.append(engine.was_step_applied())
    assert applied == [True, False, True, True]              # (DeepSpeed's answer after an overflow step)
    assert math.isnan(losses[1]) and all(math.isfinite(x) for x in losses[:1] + losses[2:])
    assert engine.skipped_steps == 1 and engine.global_steps == 4
    assert [r.step for r in engine.step_log] == [0, 2, 3]
    rebuilt = replay(copy.deepcopy(base), engine.step_log)
    sd = engine.module_state_dict()
    assert all(torch.equal(p, sd[n]) for n, p in rebuilt.named_parameters())
    assert poison.calls == 4


def test_consecutive_non_finite_losses_abort_with_a_clear_message():
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=1, max_consecutive_skips=3))
    engine.train_batch(batch())
    good = {n: p.clone() for n, p in engine.module_state_dict().items()}
    _Poison(engine.module, bad_calls=range(1, 100))
    engine.train_batch(batch())
    engine.train_batch(batch())
    with pytest.raises(NonFiniteLossError, match="3 consecutive ZO steps.*max_consecutive_skips = 3"):
        engine.train_batch(batch())
    sd = engine.module_state_dict()  # the last good step (its fused update included) and nothing else
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert len(engine.step_log) == 1 and all(torch.equal(sd[n], good[n]) for n in good)


def test_a_resumed_run_counts_the_non_finite_steps_in_a_row_before_its_checkpoint(tmp_path):
    """The count of non-finite steps in a row is saved with the checkpoint: a run resumed after two of them stops at
    the third, as the uninterrupted run does (it used to start counting again)."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=1, max_consecutive_skips=3))
    engine.train_batch(batch())
    _Poison(engine.module, bad_calls=range(1, 100))
    engine.train_batch(batch())
    engine.train_batch(batch())
    engine.save_checkpoint(str(tmp_path))
    resumed, *_ = ds_zo.initialize(model=tiny_model("llama"), config=ds_config(seed=1, max_consecutive_skips=3))
    resumed.load_checkpoint(str(tmp_path))
    _Poison(resumed.module, bad_calls=range(1, 100))
    with pytest.raises(NonFiniteLossError, match="3 consecutive ZO steps .up to step 3"):
        resumed.train_batch(batch())
    assert resumed.skipped_steps == 3


def test_a_failed_shard_all_gather_says_which_calls_every_rank_must_make(monkeypatch):
    """Under ZeRO-3 a direct forward or generate on some ranks only (or generating to other lengths) and
    module_state_dict() on rank 0 only waited in a shard all-gather until the timeout, which blamed a dead peer. The
    message now names those calls and generate's synced_gpus=True."""
    import torch.distributed as dist
    from ds_zo.parallel import Communicator, ParallelDims
    from ds_zo.parallel.communicator import CollectiveError

    def timed_out(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms")
    monkeypatch.setattr(dist, "all_gather_into_tensor", timed_out)
    dims = ParallelDims(world=2, rank=1)
    dims.groups["partition"] = None
    comm = Communicator(dims, 30.0, staging_device=torch.device("cpu"))
    with pytest.raises(CollectiveError, match=r"rank 1/2: shard all-gather \(under ZeRO-3 every forward through the "
                                              r"model, direct ones and generate included, and "
                                              r"engine.module_state_dict\(\) gather .*synced_gpus=True\) over the "
                                              r"partition group failed \(timeout 30 s"):
        comm.all_gather_shards(torch.zeros(4), torch.zeros(2))
