"""The ZO2 offload pipeline, run on CPU with no-op streams (the same scheduler as on CUDA)."""
import copy
import math

import pytest
import torch

import ds_zo
from ds_zo.perturb import PerturbationGenerator
from conftest import ds_config
from models import VOCAB, batch, tiny_model
from reference import MeZOReference

STEPS = 3


def offload_config(depth=1, overlap=True, dtype=None, resident=None, wd=0.1, **kw):
    zo = dict(seed=3, prefetch_depth=depth, overlap=overlap, **kw)
    if dtype:
        zo["offload_dtype"] = dtype
    if resident is not None:
        zo["resident_units"] = resident
    cfg = ds_config(lr=1e-2, eps=1e-3, wd=wd, **zo)
    cfg["zero_optimization"] = {"stage": 0, "offload_param": {"device": "cpu", "pin_memory": True}}
    return cfg


def _run(model, cfg, steps=STEPS, micro_rows=2):
    engine, *_ = ds_zo.initialize(model=model, config=cfg)
    losses = [engine.train_batch(batch(seed=t)) for t in range(steps)]
    return engine, losses


def _layer_bytes(engine):
    return sum(s.nbytes for s in engine.pipeline.order)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_offload_matches_resident_and_reference(arch):
    base = tiny_model(arch)
    resident, l_res = _run(copy.deepcopy(base), ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3))
    offloaded, l_off = _run(copy.deepcopy(base), offload_config())
    ref = MeZOReference(base, lr=1e-2, eps=1e-3, wd=0.1, seed=3)
    l_ref = [ref.step(batch(seed=t))[0] for t in range(STEPS)]
    assert l_off == l_res == pytest.approx(l_ref, rel=1e-5)
    a, b = resident.module_state_dict(), offloaded.module_state_dict()
    for n, p in ref.params().items():
        assert torch.equal(a[n], b[n]), n
        torch.testing.assert_close(b[n], p, rtol=1e-5, atol=0)
    assert offloaded.pipeline is not None and resident.pipeline is None
    assert len(offloaded.pipeline.order) == 2  # the two decoder layers; embeddings, norm and head stay resident


@pytest.mark.parametrize("depth, overlap", [(1, True), (1, False), (2, True), (3, True)])
def test_prefetch_depth_and_overlap_do_not_change_results(depth, overlap):
    base = tiny_model("qwen2")
    ref_engine, _ = _run(copy.deepcopy(base), offload_config(depth=1))
    engine, _ = _run(copy.deepcopy(base), offload_config(depth=depth, overlap=overlap, resident=["*embed*", "lm_head"]))
    a, b = ref_engine.module_state_dict(), engine.module_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert engine.pipeline.stats["order_misses"] == 0


def _deep_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_schedule_trace_shows_overlap_window_and_once_up_once_down(depth):
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=depth))
    engine.train_batch(batch(seed=0))
    trace = engine.pipeline.trace = []
    engine.train_batch(batch(seed=1))           # a steady-state step: the previous step's update is pending
    names = [s.unit.name for s in engine.pipeline.order]
    assert len(names) == 6
    pos = {(op, name): i for i, (op, name) in enumerate(trace)}
    for name in names:                          # once up, once down, in the order upload < compute < offload
        assert [op for op, n in trace if n == name] == ["upload", "compute_begin", "compute_end", "offload"]
    for i in range(len(names) - 1):             # the next upload is issued before this compute completes
        assert pos[("upload", names[i + 1])] < pos[("compute_end", names[i])]
    for i in range(len(names) - depth):         # and runs `depth` units ahead
        assert pos[("upload", names[i + depth])] < pos[("compute_begin", names[i])]
    resident, peak = set(), 0                   # never more than depth + 2 units hold a device buffer
    for op, name in trace:
        if op == "upload":
            resident.add(name)
        elif op == "offload":
            resident.discard(name)
        peak = max(peak, len(resident))
    assert peak <= depth + 2
    assert len(engine.pipeline.buffers) == min(depth + 2, 6)


def _moved(engine):
    stats = engine.comm_stats()
    assert stats["allgather_bytes"] == stats["allreduce_bytes"] == 0  # one process: no collectives
    return {k: stats[k] for k in ("h2d_bytes", "d2h_bytes")}


def test_comm_stats_equal_the_analytic_count():
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=2))
    U = _layer_bytes(engine)
    assert U == sum(p.numel() * 4 for n, p in engine.module.named_parameters() if ".layers." in n)
    assert engine.comm_stats() == {"h2d_bytes": 0, "d2h_bytes": 0, "allgather_bytes": 0, "allreduce_bytes": 0}
    k = 4
    for t in range(k):
        engine.train_batch(batch(seed=t))
    # one upload per unit per step; one offload per unit per step that applied a pending update (not step 0)
    assert _moved(engine) == {"h2d_bytes": k * U, "d2h_bytes": (k - 1) * U}
    engine.module_state_dict()                  # the flush streams the last update through: one more up and down
    assert _moved(engine) == {"h2d_bytes": (k + 1) * U, "d2h_bytes": k * U}
    engine.module_state_dict()                  # nothing pending: no traffic
    assert _moved(engine) == {"h2d_bytes": (k + 1) * U, "d2h_bytes": k * U}
    engine.eval_batch(batch())                  # evaluation streams every unit up, nothing down
    assert _moved(engine) == {"h2d_bytes": (k + 2) * U, "d2h_bytes": k * U}


def test_store_is_the_only_copy_of_offloaded_parameters():
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=1))
    store = engine.pipeline.store
    for s in store.units.values():
        lo = s.flat.data_ptr()
        hi = lo + s.nbytes
        for p in s.params:
            assert lo <= p.data_ptr() < hi        # the module's parameters are views of the flat store
    # host memory for parameters: the store plus the resident units, i.e. one copy of the model
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in engine.module.parameters()}
    model_bytes = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    assert sum(storages.values()) == model_bytes
    # device-side working set: depth + 2 unit buffers
    assert engine.pipeline.nbytes_device() == 3 * max(s.nbytes for s in store.units.values())


def test_eval_direct_forward_and_generate_stream_the_units():
    base = tiny_model("llama")
    resident, _ = _run(copy.deepcopy(base), ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3))
    offloaded, _ = _run(copy.deepcopy(base), offload_config())
    b = batch()
    assert offloaded.eval_batch(b) == resident.eval_batch(b)
    before = offloaded.comm_stats()["h2d_bytes"]
    with torch.no_grad():
        out_off = offloaded.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out_res = resident.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.equal(out_off, out_res)
    assert offloaded.comm_stats()["h2d_bytes"] == before + _layer_bytes(offloaded)
    assert all("forward" not in u.module.__dict__ for u in offloaded.units)  # streaming wrappers removed
    gen_off = offloaded.module.generate(b["input_ids"][:1], max_new_tokens=5, do_sample=False)
    gen_res = resident.module.generate(b["input_ids"][:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen_off, gen_res)


def test_n_spsa_and_micro_batches_under_offload():
    base = tiny_model("llama")
    a, _ = _run(copy.deepcopy(base), ds_config(lr=1e-2, eps=1e-3, wd=0.1, seed=3, num_perturbations=2))
    b, _ = _run(copy.deepcopy(base), offload_config(num_perturbations=2))
    sa, sb = a.module_state_dict(), b.module_state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    # all four slots run in one forward: still one upload per unit per step
    assert b.pipeline.stats["uploads"] == (STEPS + 1) * 2  # + the flush of module_state_dict


def test_bf16_storage_rounds_the_fp32_update_once():
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=offload_config(dtype="bf16", wd=0.0))
    store = engine.pipeline.store
    flats0 = {id(s): s.flat.clone() for s in store.units.values()}
    assert all(s.flat.dtype == torch.bfloat16 for s in store.units.values())
    engine.train_batch(batch(seed=0))
    engine.flush()
    rec = engine.step_log[0]
    gen = PerturbationGenerator()
    for s in store.units.values():
        for p, o in zip(s.params, s.offsets):
            n = p.numel()
            z = gen.z(rec.seed, 0, engine.param_keys[id(p)], n)
            theta = flats0[id(s)][o:o + n].float()
            expected = (theta - rec.lr * (rec.g[0] * z)).bfloat16()
            assert torch.equal(s.flat[o:o + n], expected)
    # resident units keep the model dtype and are exact
    assert engine.module.model.embed_tokens.weight.dtype == torch.float32


def test_offload_refuses_tied_weights_and_empty_sets():
    with pytest.raises(ValueError, match="tied"):
        ds_zo.initialize(model=tiny_model("llama", tied=True), config=offload_config(resident=[]))
    with pytest.raises(ValueError, match="no unit is offloaded"):
        ds_zo.initialize(model=tiny_model("llama"), config=offload_config(resident=["*"]))
    # untied: everything may be offloaded, embeddings and head included
    engine, *_ = ds_zo.initialize(model=tiny_model("llama", tied=False), config=offload_config(resident=[]))
    assert len(engine.pipeline.order) == len(engine.units)
    engine.train_batch(batch())


def test_next_pass_does_not_start_in_the_buffer_being_offloaded():
    """Round-robin continues across passes, so the first upload of a pass never targets the buffer that the previous
    pass's last unit is still being offloaded from (on a GPU that would serialise the two passes)."""
    # 6 units, 5 buffers: a pass restarting at buffer 0 would land on the previous pass's last buffer (5 % 5 == 0)
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=3))
    pipe = engine.pipeline
    engine.train_batch(batch(seed=0))
    last_unit = pipe.order[-1].unit
    last_buffer = pipe._buffer_of(pipe.index[id(last_unit)])
    pipe.begin()
    assert pipe._buffer_of(0) != last_buffer
    assert pipe._buffer_of(0) == (last_buffer + 1) % len(pipe.buffers)


def test_steady_state_steps_make_no_new_events():
    """Each unit's events (loaded, computed, landed) are made once and recorded again at every visit: new events are
    host time on every visit of a host-bound GPU step. Timing events (opt-in, benchmarks) are new ones."""
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=2))
    pipe = engine.pipeline
    for t in range(2):              # (the first step has no pending update: nothing written back, no "landed" yet)
        engine.train_batch(batch(seed=t))
    made = []
    event = pipe.streams.event
    pipe.streams.event = lambda timing=False: made.append(timing) or event(timing)   # this instance only
    before, offloads = [s.flat.clone() for s in pipe.order], pipe.stats["offloads"]
    for t in range(2, 4):
        engine.train_batch(batch(seed=t))
    assert made == []
    assert pipe.stats["offloads"] - offloads == 2 * len(pipe.order)     # every visit wrote its unit back
    assert all(not torch.equal(b, s.flat) for b, s in zip(before, pipe.order))
    pipe.time_transfers = True
    engine.train_batch(batch(seed=4))
    assert made == [True] * (4 * len(pipe.order))    # per unit: its upload's start and end, its wait's two


def test_upload_timing_is_opt_in_and_counts_every_timed_upload():
    """Benchmarks time uploads while they run (CUDA: timing events; CPU: the synchronous copy); off by default."""
    engine, *_ = ds_zo.initialize(model=_deep_model(), config=offload_config(depth=2))
    engine.train_batch(batch(seed=0))
    assert engine.pipeline.h2d_transfer_rate() is None          # nothing timed unless asked
    engine.pipeline.time_transfers = True
    engine.train_batch(batch(seed=1))
    engine.pipeline.time_transfers = False
    timed = list(engine.pipeline._transfer_times)
    assert len(timed) == len(engine.pipeline.order)             # one timed upload per offloaded unit
    assert sum(n for _, _, n in timed) == _layer_bytes(engine)
    rate = engine.pipeline.h2d_transfer_rate()
    assert rate is not None and rate > 0
    assert engine.pipeline.h2d_transfer_rate() is None          # read once, then forgotten
    stall = engine.pipeline.upload_stall_s()                     # compute's waits for uploads, one per unit visit
    assert stall is not None and 0 <= stall < 1e-3               # CPU: every upload finished before its compute
    assert engine.pipeline.upload_stall_s() is None


@pytest.mark.parametrize("failure", ["bad_ids", "copy_oom", "update_oom", "update_part_way", "interrupt"])
@pytest.mark.parametrize("stage", [0, 3])
def test_a_step_that_fails_mid_forward_loses_no_update(stage, failure, tmp_path, monkeypatch):
    """A step that fails part-way goes on as if it had never come, and a checkpoint saved right after the failure
    holds every update:
    - bad_ids: a batch with an out-of-range token id fails inside the forward, after the pipeline has prefetched its
      first units. Resliced units (ZeRO-3) take their pending update as they are loaded: those prefetched but never
      computed are retired (written back) when the next pass begins or the engine flushes (the update used to be
      lost for good: the optimizer counted it applied). ZO2 offload applies updates on entry.
    - copy_oom: out of memory for a decoder layer's working copy, after the layer was entered and its pending update
      applied. The layer used to stay the occupant of its device buffer, unwritten: the update was lost, and its
      parameters kept pointing at a buffer the next pass filled with another layer.
    - update_oom: out of memory for an offloaded layer's pending update, before it changes anything: the layer
      leaves residency, and the update stays owed (it used to be counted as applied).
    - update_part_way: the same after one span group of that update has changed the layer (small chunks, the
      element-wise path): the next read applies the rest, not the whole update again.
    - interrupt: Ctrl-C during the native fused update of the first offloaded layer, raised as the kernel returns
      (before Python could note it ran): the update is not applied a second time."""
    import ds_zo.optimizer
    if failure == "update_part_way":
        monkeypatch.setattr(PerturbationGenerator.__init__, "__defaults__", ("gaussian", 1000, "auto"))

    def engine_of():
        cfg = offload_config(depth=1)
        cfg["zero_optimization"]["stage"] = stage
        cfg["zero_optimization"]["offload_param"]["pin_memory"] = False
        engine = ds_zo.initialize(model=tiny_model("llama"), config=cfg)[0]
        engine.perturbations.fused_passes = failure != "update_part_way"   # (the native sweep has no span groups)
        return engine

    def fail(engine):
        if failure == "bad_ids":
            wrong = batch(seed=50)
            wrong["input_ids"][0, 0] = VOCAB + 5
            with pytest.raises(IndexError, match="token id out of range"):
                engine.train_batch(wrong)
            return
        layer_keys = {engine.param_keys[id(r.param)] for s in engine.pipeline.order for r in s.unit.trainable}
        if failure == "interrupt":
            gen, calls = engine.perturbations, [0]
            real = gen._fused_kernels

            class Interrupted:          # the kernels, but Ctrl-C arrives as the second update sweep returns
                def __init__(self, kernels):
                    self.kernels = kernels

                def __getattr__(self, name):
                    return getattr(self.kernels, name)

                def update_pieces(self, *args):
                    out = self.kernels.update_pieces(*args)
                    calls[0] += 1
                    if calls[0] == 2:       # the embedding's, then the first decoder layer's (offloaded)
                        gen._fused_kernels = real
                        raise KeyboardInterrupt
                    return out
            gen._fused_kernels = lambda grads: None if real(grads) is None else Interrupted(real(grads))
            with pytest.raises(KeyboardInterrupt):
                engine.train_batch(batch(seed=50))
            assert calls[0] == 2 and gen._fused_kernels is real
            return
        if failure == "copy_oom":
            owner, name = engine.copies.buffers, "get"
            hit = lambda args, calls: str(args[0]).startswith("slot")                      # noqa: E731
        elif failure == "update_oom":
            owner, name = engine.optimizer, "_apply_pieces"
            hit = lambda args, calls: any(piece[1] in layer_keys for piece in args[0])     # noqa: E731
        else:
            owner, name = ds_zo.optimizer, "apply_step_pieces"
            hit = lambda args, calls: any(piece[1] in layer_keys for piece in args[0]) and calls > 1  # noqa: E731
        original, calls = getattr(owner, name), [0]

        def once(*args, **kwargs):
            if failure == "update_part_way" and any(piece[1] in layer_keys for piece in args[0]):
                calls[0] += 1
            if hit(args, calls[0]):
                setattr(owner, name, original)
                raise torch.OutOfMemoryError(f"simulated: out of memory in {name}")
            return original(*args, **kwargs)
        setattr(owner, name, once)
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            engine.train_batch(batch(seed=50))
        assert getattr(owner, name) is original          # it did fail where meant
        if stage == 0:      # every offloaded layer's parameters point at its store again, not at a device buffer
            for s in engine.pipeline.order:
                assert all(r.param.data.untyped_storage().data_ptr() == s.flat.untyped_storage().data_ptr()
                           for r in s.unit.trainable)

    def state(engine):
        return {k: v.clone() for k, v in engine.module_state_dict().items()}
    clean = engine_of()
    for t in range(STEPS):
        clean.train_batch(batch(seed=t))
    going_on = engine_of()                    # fails, then trains on
    for t in range(STEPS):
        if t == 1:
            fail(going_on)
        going_on.train_batch(batch(seed=t))
    saved = engine_of()                       # fails, is saved at once, and a new engine trains on from the save
    saved.train_batch(batch(seed=0))
    fail(saved)
    saved.save_checkpoint(str(tmp_path))
    resumed = engine_of()
    resumed.load_checkpoint(str(tmp_path))
    for t in range(1, STEPS):
        resumed.train_batch(batch(seed=t))
    assert type(going_on.pipeline).__name__ == ("ShardedOffloadPipeline" if stage == 3 else "OffloadPipeline")
    want = state(clean)
    for engine in (going_on, resumed):
        got = state(engine)
        assert all(torch.equal(want[k], got[k]) for k in want)
    if failure == "bad_ids":
        assert going_on.pipeline.stats["retired"] == saved.pipeline.stats["retired"] == 2   # the failed pass's units


def test_a_refused_direct_forward_leaves_the_model_as_it_was():
    """A direct forward whose offload pass is refused as it begins (on a GPU: run under another CUDA stream; here
    the refusal is simulated) raises, and leaves no ZO wrapper on the model's units even while its exception is
    kept (a notebook keeps the last one): the next step and forward are those of a run without it. The wrappers
    used to stay, and the next step computed with stale working copies."""
    def run(refuse):
        engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=offload_config(depth=1))
        engine.train_batch(batch(seed=0))
        engine.flush()                       # nothing pending: the direct forward begins its pass at once
        kept = None
        if refuse:
            streams = engine.pipeline.streams

            def refused():
                del streams.check_compute_stream          # once
                raise RuntimeError("ds_zo: the offload pipeline computes on another CUDA stream (simulated)")
            streams.check_compute_stream = refused
            with pytest.raises(RuntimeError, match="simulated") as kept:
                engine.module(input_ids=batch(seed=3)["input_ids"])
            assert not any("forward" in u.module.__dict__ for u in engine.units)
            assert engine._streaming is None and engine._streaming_owner is None
        engine.train_batch(batch(seed=1))
        with torch.no_grad():
            logits = engine.module(input_ids=batch(seed=3)["input_ids"]).logits
        return engine.last_projected_grad, logits, engine.module_state_dict(), kept
    g, logits, state, _ = run(False)
    g2, logits2, state2, kept = run(True)
    assert kept is not None and g2 == g and torch.equal(logits2, logits)
    assert all(torch.equal(state[k], state2[k]) for k in state)


def _train_offloaded(base, stage, between=None, dtype=None, **zo):
    """STEPS steps of an offloaded copy of `base` at ZeRO `stage`, `between(engine)` after each; (losses, params)."""
    cfg = offload_config(dtype=dtype, **zo)
    cfg["zero_optimization"]["stage"] = stage
    engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
    losses = []
    for t in range(STEPS):
        losses.append(engine.train_batch(batch(seed=t)))
        if between is not None:
            between(engine)
    return losses, engine.module_state_dict()


def _identical(run, other) -> bool:
    return run[0] == other[0] and all(torch.equal(p, other[1][n]) for n, p in run[1].items())


@pytest.mark.parametrize("stage", [0, 3])
def test_narrower_storage_trains_the_same_whether_updates_are_fused_flushed_or_eager(stage):
    """With offload_dtype narrower than the compute dtype, an update applied inside the next forward is rounded to
    the storage dtype before the forward uses it, as a flushed (state_dict, copy) or eager update is: so reading the
    model between steps, or fuse_update, does not change training (stage 3: the resliced pipeline rounds each shard)."""
    base = tiny_model("llama")
    fused = _train_offloaded(base, stage, dtype="bf16")
    assert _identical(fused, _train_offloaded(base, stage, lambda e: e.module_state_dict(), dtype="bf16"))
    assert _identical(fused, _train_offloaded(base, stage, dtype="bf16", fuse_update=False))


@pytest.mark.parametrize("stage", [0, 3])
def test_the_optimizers_state_dict_flushes_through_the_pipeline(stage):
    """engine.optimizer.state_dict() applies the pending update as engine.flush() does: offloaded units through the
    pipeline (resliced ones are shards the optimizer cannot reach itself), so calling it between steps changes
    nothing in training."""
    base = tiny_model("llama")

    def read_optimizer(engine):
        assert "zo_step_log" in engine.optimizer.state_dict()
        assert engine.optimizer.pending is None

    assert _identical(_train_offloaded(base, stage), _train_offloaded(base, stage, read_optimizer))


def test_a_copy_and_a_destroyed_model_with_narrower_storage_compute_in_one_dtype():
    """With offload_dtype, the offloaded layers are views of a bf16 store while the rest of the model is fp32. A
    deep copy of the model, and the model after destroy(), hold them in the dtype they compute in (exactly the
    stored values), so either runs alone and gives the engine's own forward."""
    engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=offload_config(dtype="bf16"))
    engine.train_batch(batch())
    engine.train_batch(batch(seed=2))
    best = copy.deepcopy(engine.module)
    assert {p.dtype for p in best.parameters()} == {torch.float32}
    ids = batch()["input_ids"]
    with torch.no_grad():
        expected = engine.module(input_ids=ids).logits
        assert torch.equal(best(input_ids=ids).logits, expected)
    trained = engine.module_state_dict()
    assert {t.dtype for t in trained.values()} == {torch.float32, torch.bfloat16}
    model = engine.module
    engine.destroy()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(t, trained[n].float()) for n, t in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_bf16_under_zero3_trains_in_bf16_as_at_stage_0():
    """zero.Init(module=...) partitions a built model without casting it, and DeepSpeed's engine does not cast
    ZeRO-3 parameters: with bf16 enabled a ZeRO-3 run trained in fp32. The model is cast before partitioning now,
    so a one-rank ZeRO-3 run (resliced pipeline) is the stage-0 offloaded run, bit for bit, in bf16."""
    base = tiny_model("llama")
    runs = []
    for stage in (0, 3):
        cfg = offload_config()
        cfg["bf16"] = {"enabled": True}
        cfg["zero_optimization"]["stage"] = stage
        engine, *_ = ds_zo.initialize(model=copy.deepcopy(base), config=cfg)
        assert {b.dtype for b in engine.pipeline.buffers} == {torch.bfloat16}
        runs.append(([engine.train_batch(batch(seed=t)) for t in range(STEPS)], engine.module_state_dict()))
    (losses0, params0), (losses3, params3) = runs
    assert losses0 == losses3
    assert {t.dtype for t in params3.values()} == {torch.bfloat16}
    assert all(torch.equal(p, params3[n]) for n, p in params0.items())


def test_a_zero3_model_with_narrower_storage_goes_to_a_new_engine_after_destroy():
    """Under ZeRO-3 the resliced units' shards (ds_tensor) are views of the bf16 store: destroy() casts them back
    to the compute dtype, so a new engine on the model computes in fp32 and continues the run's weights; the
    destroyed engine refuses to read the model (its store is stale once the new engine trains)."""
    cfg = offload_config(dtype="bf16")
    cfg["zero_optimization"]["stage"] = 3
    model = tiny_model("llama")
    first, *_ = ds_zo.initialize(model=model, config=cfg)
    first.train_batch(batch())
    trained = first.module_state_dict()
    first.destroy()
    assert {p.ds_tensor.dtype for p in model.parameters() if hasattr(p, "ds_tensor")} == {torch.float32}
    second, *_ = ds_zo.initialize(model=model, config=cfg)
    assert {b.dtype for b in second.pipeline.buffers} == {torch.float32}
    assert all(torch.equal(t.float(), trained[n].float()) for n, t in second.module_state_dict().items())
    assert math.isfinite(second.train_batch(batch(seed=2)))
    with pytest.raises(RuntimeError, match="module_state_dict: this engine was destroyed"):
        first.module_state_dict()


def test_a_model_partitioned_in_fp32_is_refused_under_a_bf16_config():
    """DeepSpeed does not cast a model that is already ZeRO-3 partitioned (it takes the shards to be in the
    config's dtype): one partitioned in fp32 would train in fp32 under a bf16 config, so it is refused, naming both."""
    import deepspeed
    import deepspeed.comm as dist
    from ds_zo.parallel.launch_env import ensure_launch_env
    ensure_launch_env()
    dist.init_distributed(dist_backend="gloo")
    model = tiny_model("llama")
    zero3 = {"train_micro_batch_size_per_gpu": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(module=model, config_dict_or_path=zero3, remote_device="cpu", pin_memory=False):
        pass
    cfg = offload_config()
    cfg["bf16"] = {"enabled": True}
    cfg["zero_optimization"]["stage"] = 3
    with pytest.raises(ValueError, match=r"already ZeRO-3 partitioned in \['torch.float32'\].*enables torch.bfloat16"):
        ds_zo.initialize(model=model, config=cfg)


def test_a_resident_units_pattern_that_matches_no_unit_is_refused_by_name():
    """A typo in zero_order.resident_units would offload the units it meant to keep on the device (a tied embedding
    then fails further on, an untied one silently streams): the pattern is named, with the units' names."""
    with pytest.raises(ValueError, match=r"zero_order.resident_units: \['\*embd\*'\] match no unit; units are named "
                                         r"\['model.embed_tokens'"):
        ds_zo.initialize(model=tiny_model("llama", tied=False), config=offload_config(resident=["*embd*", "lm_head"]))


@pytest.mark.parametrize("stage", [0, 3])
def test_the_optimizers_own_flush_goes_through_the_engine(stage):
    """engine.optimizer.flush() (ZOSGD's, public like DeepSpeed optimizers' methods) updated offloaded parameters on
    their own: under ZeRO-3 they are placeholders there, so the pending update was counted as applied and lost; at
    stage 0 it drew z on the host. It is the engine's flush now: the run equals one that never called it."""
    def run(call_flush):
        cfg = offload_config()
        cfg["zero_optimization"]["stage"] = stage
        engine, *_ = ds_zo.initialize(model=tiny_model("llama"), config=cfg)
        for t in range(3):
            engine.train_batch(batch(seed=t))
            if call_flush:
                engine.optimizer.flush()
                assert engine.optimizer.pending is None
        state = engine.module_state_dict()
        engine.destroy()
        return state
    plain, flushed = run(False), run(True)
    assert all(torch.equal(p, flushed[n]) for n, p in plain.items())
