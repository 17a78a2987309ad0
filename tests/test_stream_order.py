"""The offload pipeline's stream discipline, checked on CPU: every access of its memories from two streams (or a stream
and the host) is ordered by an event wait or a host synchronisation, as CUDA needs it to be (tests/stream_order.py).
On CPU the pipeline runs in issue order, so the other offload tests cannot see a missing wait; a GPU would race."""
import pytest
import torch
from transformers import LlamaForCausalLM

import ds_zo
import ds_zo.offload.pipeline as pipeline_module
from ds_zo import native
from conftest import ds_config
from models import batch, tiny_model
from stream_order import SimulatedStreams, StreamOrderChecker, Timeline


def _model():
    """tests/models.py's tiny Llama with 5 layers: enough for two layers to swap and for buffers to be reused."""
    config = tiny_model("llama").config
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _config(stage, depth, dtype, fuse):
    zo = {"seed": 3, "prefetch_depth": depth, "fuse_update": fuse}
    if dtype:
        zo["offload_dtype"] = dtype
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=0.1, **zo)
    cfg["zero_optimization"] = {"stage": stage, "offload_param": {"device": "cpu", "pin_memory": True}}
    return cfg


def _exercise(engine, tmp_path):
    """What touches the pipeline: steps, reads of the weights, evaluation, a direct forward, a forward that fails
    half-way (its prefetched units are retired), a step with two layers swapped (units out of order), a flush, and a
    checkpoint saved and loaded (host reads and writes of the store)."""
    for t in range(2):
        engine.train_batch(batch(seed=t))
    engine.module_state_dict()
    engine.eval_batch(batch(seed=5))
    with torch.no_grad():
        engine.module(input_ids=batch(seed=6)["input_ids"])
    layers = engine.module.model.layers

    def fail(*args, **kwargs):
        raise RuntimeError("a failure half-way through the forward")
    layers[3].forward = fail
    with pytest.raises(RuntimeError, match="half-way"):
        engine.train_batch(batch(seed=7))
    del layers[3].forward
    engine.train_batch(batch(seed=8))
    layers[1], layers[4] = layers[4], layers[1]
    engine.train_batch(batch(seed=9))
    layers[1], layers[4] = layers[4], layers[1]
    engine.train_batch(batch(seed=10))
    engine.save_checkpoint(str(tmp_path))
    engine.train_batch(batch(seed=11))
    engine.load_checkpoint(str(tmp_path))
    engine.train_batch(batch(seed=12))
    engine.flush()
    engine.module_state_dict()


def _checked_run(monkeypatch, tmp_path, stage, depth=1, dtype=None, fuse=True, **timeline):
    timeline = Timeline(**timeline)
    monkeypatch.setattr(pipeline_module, "Streams", lambda device, overlap: SimulatedStreams(timeline, overlap))
    monkeypatch.setattr(native, "chunk_draws", lambda: None)     # raw-pointer kernels: invisible to the checker
    engine, *_ = ds_zo.initialize(model=_model(), config=_config(stage, depth, dtype, fuse))
    checker = StreamOrderChecker(timeline)
    checker.register_pipeline(engine.pipeline)
    try:
        with checker:
            _exercise(engine, tmp_path)
    finally:
        engine.destroy()
    return engine, checker


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("depth,dtype,fuse", [(1, None, True), (2, "bf16", True), (1, "bf16", False)])
def test_every_cross_stream_access_is_ordered(monkeypatch, tmp_path, stage, depth, dtype, fuse):
    engine, checker = _checked_run(monkeypatch, tmp_path, stage, depth, dtype, fuse)
    assert checker.races == []
    streams = {"compute", "h2d", "d2h", "host"} | ({"side1"} if stage == 3 else set())
    assert streams <= {name for name, n in checker.accesses.items() if n > 0}, checker.accesses
    # each stream's own writes are seen: uploads, write-backs, the updates (compute's; at stage 3 the all-gather
    # stream's, which updates its shard and gathers, and compute only reads), the host's checkpoint load
    writers = {"h2d", "d2h", "host"} | ({"side1"} if stage == 3 else {"compute"})
    assert writers <= {name for name, n in checker.writes.items() if n > 0}, checker.writes
    stats = engine.pipeline.stats
    assert stats["order_misses"] > 0 and stats["retired"] > 0 and stats["offloads"] > 0, stats


@pytest.mark.parametrize("stage,dropped", [
    (0, ("compute", "h2d")),       # compute does not wait for its upload
    (0, ("h2d", "compute")),       # an upload does not wait for the buffer's last compute
    (0, ("h2d", "d2h")),           # an upload does not wait for the unit's write-back (or the buffer's)
    (0, ("d2h", "compute")),       # a write-back does not wait for the update and compute on the unit
    (3, ("side1", "h2d")),         # the all-gather does not wait for the shard's upload
    (3, ("compute", "side1")),     # compute does not wait for the all-gather
])
def test_the_checker_reports_a_dropped_wait(monkeypatch, tmp_path, stage, dropped):
    """The check can fail: without any one of the pipeline's waits, it reports unordered accesses."""
    _, checker = _checked_run(monkeypatch, tmp_path, stage, dtype="bf16", dropped_waits=frozenset({dropped}))
    assert checker.races, f"dropping the wait of {dropped[0]} on {dropped[1]} went unnoticed"


def test_the_checker_reports_host_access_without_synchronisation(monkeypatch, tmp_path):
    """Host reads and writes of the store (state dicts, checkpoints) come after a synchronisation with the streams
    that write and read it; without it they race with the write-backs."""
    _, checker = _checked_run(monkeypatch, tmp_path, 0, host_syncs=False)
    assert any(" on host" in race for race in checker.races), checker.races[:3]
